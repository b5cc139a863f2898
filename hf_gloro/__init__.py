"""hf-gloro: certifiably robust (GloRo) image classifiers for the Hugging Face ecosystem.

Importing the package registers the Lipschitz backbones in timm's registry and ``GloRoConfig`` /
``GloRoForImageClassification`` with the ``transformers`` Auto classes.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from . import models  # noqa: F401  (timm registration)
from .configuration_gloro import GloRoConfig
from .image_processing import GloRoImageProcessor, gloro_image_processor, image_processor_for_config
from .modeling_gloro import (
    GloRoCertificate,
    GloRoForImageClassification,
    GloRoImageClassifierOutput,
    CertificationRefusedError,
    GloRoPreTrainedModel,
    InconsistentCheckpointError,
    ReducedPrecisionError,
)

AutoConfig.register("gloro", GloRoConfig, exist_ok=True)
AutoModelForImageClassification.register(GloRoConfig, GloRoForImageClassification, exist_ok=True)
AutoImageProcessor.register(GloRoConfig, fast_image_processor_class=GloRoImageProcessor, exist_ok=True)

from .hub import push_certified_model, push_model_card, save_certified_model, write_remote_code  # noqa: E402
from .model_card import CertifiedEvaluation, build_model_card, evaluate_for_card, write_model_card  # noqa: E402
from .pipelines import CertifiedImageClassificationPipeline, register_pipeline  # noqa: E402

register_pipeline()

__version__ = "0.1.0"

# Training pulls in transformers.Trainer and accelerate: loaded on first use, not on `import hf_gloro`.
_LAZY = {
    "GloRoTrainer": "trainer",
    "GloRoTrainingArguments": "trainer",
    "CertifiedMetricsCSVCallback": "trainer",
    "Schedule": "schedules",
    "gloro_loss": "losses",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CertifiedMetricsCSVCallback",
    "GloRoTrainer",
    "GloRoTrainingArguments",
    "Schedule",
    "gloro_loss",
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
    "CertificationRefusedError",
    "ReducedPrecisionError",
    "gloro_image_processor",
    "image_processor_for_config",
]
