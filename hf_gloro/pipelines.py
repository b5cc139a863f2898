"""``pipeline("certified-image-classification")``: image classification with an L2 certificate per image.

Example:

```python
>>> import hf_gloro
>>> from transformers import pipeline
>>> classifier = pipeline("certified-image-classification", model="me/gloro-mnist")
>>> classifier("digit.png")
[{'label': '7', 'score': 0.93, 'certified': True, 'radius': 0.41, 'epsilon': 0.3}]
```
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForImageClassification
from transformers.pipelines import PIPELINE_REGISTRY, ImageClassificationPipeline

TASK = "certified-image-classification"


class CertifiedImageClassificationPipeline(ImageClassificationPipeline):
    """``ImageClassificationPipeline`` whose results carry the GloRo certificate of each image.

    Every result dict has ``label`` and ``score`` (softmax over the class logits, as in
    ``image-classification``) plus ``certified``, ``radius`` and ``epsilon``. The certificate is about the
    *predicted* class: its entry has ``certified`` (no input within L2 distance ``epsilon`` of the
    preprocessed image changes the prediction) and ``radius`` (the largest radius the certificate proves);
    other labels (``top_k > 1``) get ``certified=False`` and ``radius=0.0``. Certificates come from
    ``model.certify`` (guaranteed bound only).

    Call arguments: ``epsilon`` (default ``config.epsilon``), ``top_k`` (default 1), ``function_to_apply``,
    ``timeout``. Radii are in the pixel scale of the *preprocessed* image (after resizing, in [0, 1]).
    """

    # Images only. Left at None, `pipeline()` also tries AutoVideoProcessor, which on a repo with remote code
    # (an `auto_map` in preprocessor_config.json) asks whether to trust it even when hf-gloro is installed.
    _load_video_processor = False

    def check_model_type(self, supported_models) -> None:
        if not callable(getattr(self.model, "certify", None)):
            raise ValueError(
                f"{TASK!r} needs a GloRo model with a certify() method (hf_gloro.GloRoForImageClassification), "
                f"got {type(self.model).__name__}"
            )

    def _sanitize_parameters(self, top_k=None, function_to_apply=None, timeout=None, epsilon=None):
        preprocess, forward, postprocess = super()._sanitize_parameters(
            top_k=top_k, function_to_apply=function_to_apply, timeout=timeout
        )
        if epsilon is not None:
            epsilon = float(epsilon)
            if not (math.isfinite(epsilon) and epsilon > 0):
                raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
            forward["epsilon"] = epsilon
        return preprocess, forward, postprocess

    def _forward(self, model_inputs, epsilon: float | None = None):
        pixel_values = model_inputs["pixel_values"]
        certificate = self.model.certify(pixel_values, epsilon)
        logits = self.model(pixel_values=pixel_values, epsilon=certificate.epsilon).logits
        batch = len(pixel_values)
        # The first value must be a batched tensor: the pipeline's iterator splits outputs along dim 0.
        return {
            "logits": logits,
            "prediction": certificate.predictions,
            "certified": certificate.certified,
            "radius": certificate.radius,
            "epsilon": torch.full((batch,), certificate.epsilon, dtype=torch.float64),
        }

    def postprocess(self, model_outputs, function_to_apply=None, top_k=1):
        ranked = super().postprocess(model_outputs, function_to_apply=function_to_apply,
                                     top_k=self.model.config.num_labels)
        predicted = self.model.config.id2label[int(model_outputs["prediction"].reshape(-1)[0])]
        certified = bool(model_outputs["certified"].reshape(-1)[0])
        radius = float(model_outputs["radius"].reshape(-1)[0])
        epsilon = float(model_outputs["epsilon"].reshape(-1)[0])
        results = []
        for entry in ranked:
            is_prediction = entry["label"] == predicted
            results.append({**entry, "certified": certified and is_prediction,
                            "radius": radius if is_prediction else 0.0, "epsilon": epsilon})
        # The certified prediction comes first, even if float rounding ranked a tied label above it.
        results.sort(key=lambda entry: entry["label"] != predicted)
        return results[: max(1, min(top_k, len(results)))]


def register_pipeline() -> None:
    """Register :class:`CertifiedImageClassificationPipeline` as ``"certified-image-classification"``."""
    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=CertifiedImageClassificationPipeline,
        pt_model=AutoModelForImageClassification,
        type="image",
    )
