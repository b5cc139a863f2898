"""hf-gloro: certifiably robust (GloRo) image classifiers for the Hugging Face ecosystem.

Importing the package registers the Lipschitz backbones in timm's registry and ``GloRoConfig`` /
``GloRoForImageClassification`` with the ``transformers`` Auto classes.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from . import models  # noqa: F401  (timm registration)
from .configuration_gloro import GloRoConfig
from .image_processing import GloRoImageProcessor, gloro_image_processor
from .modeling_gloro import (
    GloRoCertificate,
    GloRoForImageClassification,
    GloRoImageClassifierOutput,
    GloRoPreTrainedModel,
    InconsistentCheckpointError,
)

AutoConfig.register("gloro", GloRoConfig, exist_ok=True)
AutoModelForImageClassification.register(GloRoConfig, GloRoForImageClassification, exist_ok=True)
AutoImageProcessor.register(GloRoConfig, fast_image_processor_class=GloRoImageProcessor, exist_ok=True)

from .hub import push_certified_model, push_model_card, save_certified_model, write_remote_code  # noqa: E402
from .model_card import CertifiedEvaluation, build_model_card, evaluate_for_card, write_model_card  # noqa: E402
from .pipelines import CertifiedImageClassificationPipeline, register_pipeline  # noqa: E402

register_pipeline()

__version__ = "0.1.0"

__all__ = [
    "CertifiedEvaluation",
    "CertifiedImageClassificationPipeline",
    "build_model_card",
    "evaluate_for_card",
    "push_certified_model",
    "push_model_card",
    "register_pipeline",
    "save_certified_model",
    "write_model_card",
    "write_remote_code",
    "GloRoCertificate",
    "GloRoConfig",
    "GloRoForImageClassification",
    "GloRoImageClassifierOutput",
    "GloRoImageProcessor",
    "GloRoPreTrainedModel",
    "InconsistentCheckpointError",
    "gloro_image_processor",
]
