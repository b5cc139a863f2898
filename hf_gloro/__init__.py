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

__version__ = "0.1.0"

__all__ = [
    "GloRoCertificate",
    "GloRoConfig",
    "GloRoForImageClassification",
    "GloRoImageClassifierOutput",
    "GloRoImageProcessor",
    "GloRoPreTrainedModel",
    "InconsistentCheckpointError",
    "gloro_image_processor",
]
