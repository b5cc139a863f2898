"""``pipeline("certified-image-classification")``: image classification with a certificate per image (L2, or L∞ for
a model with ``config.norm == "linf"``: its results then also carry ``"norm": "linf"``).

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

import base64
import io
import math
import os

import numpy as np
import torch
from transformers import AutoModelForImageClassification
from transformers.pipelines import PIPELINE_REGISTRY, ImageClassificationPipeline

from .inputs import InputError, open_image, prepare_image

TASK = "certified-image-classification"


class CertifiedImageClassificationPipeline(ImageClassificationPipeline):
    """``ImageClassificationPipeline`` whose results carry the GloRo certificate of each image.

    Every result dict has ``label`` and ``score`` (softmax over the class logits, as in
    ``image-classification``) plus ``certified``, ``radius`` and ``epsilon``. The certificate is about the
    *predicted* class: its entry has ``certified`` (no input within distance ``epsilon`` of the preprocessed
    image, in ``config.norm``, changes the prediction) and ``radius`` (the largest radius the certificate proves);
    other labels (``top_k > 1``) get ``certified=False`` and ``radius=0.0``. Certificates come from
    ``model.certify`` (guaranteed bound only).

    Call arguments: ``epsilon`` (default ``config.epsilon``), ``top_k`` (default 1), ``function_to_apply``,
    ``timeout``, ``resize`` and ``convert`` (default ``False``). Radii are in the pixel scale of the model's
    input (in [0, 1]). For an L∞ model (``config.norm == "linf"``) every result also has ``"norm": "linf"``:
    ``epsilon`` and ``radius`` are then L∞ distances (L2 results keep exactly the keys above).

    Images must have the model's size and colour mode (grayscale ``L`` for 1 channel, ``RGB`` for 3): others
    raise ``ValueError`` naming the file and the expected size, unless ``resize=True`` / ``convert=True``; the
    results of such an image then carry ``"preprocessing"`` (e.g. ``"resized from 32×32 to 28×28: the
    certificate is about this processed image, not the original"``), because the certificate is about the
    processed image and says nothing about the file.
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

    def _sanitize_parameters(self, top_k=None, function_to_apply=None, timeout=None, epsilon=None, resize=None,
                             convert=None):
        preprocess, forward, postprocess = super()._sanitize_parameters(
            top_k=top_k, function_to_apply=function_to_apply, timeout=timeout
        )
        if resize is not None:
            preprocess["resize"] = bool(resize)
        if convert is not None:
            preprocess["convert"] = bool(convert)
        if epsilon is not None:
            epsilon = float(epsilon)
            if not (math.isfinite(epsilon) and epsilon > 0):
                raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
            forward["epsilon"] = epsilon
        return preprocess, forward, postprocess

    def preprocess(self, image, timeout=None, resize: bool = False, convert: bool = False):
        config = self.model.config
        source = image if isinstance(image, str) and len(image) < 512 else "image"
        image = _load_image(image, timeout)
        if isinstance(image, (np.ndarray, torch.Tensor)):  # float arrays: only the exact input shape
            shape = tuple(image.shape)
            expected = {(config.image_size, config.image_size, config.num_channels),
                        (config.num_channels, config.image_size, config.image_size)}
            if config.num_channels == 1:
                expected.add((config.image_size, config.image_size))
            if shape not in expected:
                raise ValueError(f"array of shape {shape} does not match the model's input "
                                 f"{config.num_channels}×{config.image_size}×{config.image_size}; pass a PIL "
                                 "image (resize/convert then apply) or an array of the model's size")
            prepared, note = image, None
        else:
            source = getattr(image, "filename", None) or source
            try:
                prepared, note = prepare_image(image, config.num_channels, config.image_size, source,
                                               resize=resize, convert=convert)
            except InputError as error:
                raise ValueError(str(error).replace("(--convert)", "(convert=True)")
                                 .replace("(--resize)", "(resize=True)")) from error
        model_inputs = self.image_processor(images=prepared, return_tensors="pt", do_resize=False)
        model_inputs = model_inputs.to(self.dtype)
        width, height = image.size if not isinstance(image, (np.ndarray, torch.Tensor)) \
            else (config.image_size, config.image_size)
        # Tensors only (the pipeline batches and splits them): what was done to the image, as numbers.
        model_inputs["processed"] = torch.tensor([[note is not None, height, width,
                                                   note is not None and "converted" in note]])
        return model_inputs

    def _forward(self, model_inputs, epsilon: float | None = None):
        pixel_values = model_inputs["pixel_values"]
        certificate = self.model.certify(pixel_values, epsilon)
        logits = getattr(certificate, "logits", None)
        if logits is None:  # certificates from before GloRoCertificate.logits
            with torch.no_grad():
                logits = self.model(pixel_values=pixel_values, epsilon=certificate.epsilon).logits
        batch = len(pixel_values)
        # The first value must be a batched tensor: the pipeline's iterator splits outputs along dim 0.
        return {
            "logits": logits.float(),
            "prediction": certificate.predictions,
            "certified": certificate.certified,
            "radius": certificate.radius,
            "epsilon": torch.full((batch,), certificate.epsilon, dtype=torch.float64),
            "processed": model_inputs["processed"],
        }

    def postprocess(self, model_outputs, function_to_apply=None, top_k=1):
        ranked = super().postprocess(model_outputs, function_to_apply=function_to_apply,
                                     top_k=self.model.config.num_labels)
        predicted = self.model.config.id2label[int(model_outputs["prediction"].reshape(-1)[0])]
        certified = bool(model_outputs["certified"].reshape(-1)[0])
        radius = float(model_outputs["radius"].reshape(-1)[0])
        epsilon = float(model_outputs["epsilon"].reshape(-1)[0])
        processed, height, width, converted = (int(v) for v in model_outputs["processed"].reshape(-1)[:4])
        note = None
        if processed:
            size = self.model.config.image_size
            done = ([f"converted to {'L' if self.model.config.num_channels == 1 else 'RGB'}"] if converted else [])
            done += [f"resized from {width}×{height} to {size}×{size}"] if (height, width) != (size, size) else []
            note = "; ".join(done) + ": the certificate is about this processed image, not the original"
        results = []
        for entry in ranked:
            is_prediction = entry["label"] == predicted
            result = {**entry, "certified": certified and is_prediction, "radius": radius if is_prediction else 0.0,
                      "epsilon": epsilon}
            norm = getattr(self.model.config, "norm", "l2")
            if norm != "l2":  # L2 results keep their historical keys; any other norm is named on every result
                result["norm"] = norm
            if note is not None:
                result["preprocessing"] = note
            results.append(result)
        # The certified prediction comes first, even if float rounding ranked a tied label above it.
        results.sort(key=lambda entry: entry["label"] != predicted)
        return results[: max(1, min(top_k, len(results)))]


def _load_image(image, timeout=None):
    """A PIL image (no colour conversion, EXIF orientation applied) from a path, URL, base64 string or PIL
    image; uint8 arrays become PIL images; other arrays and tensors are returned as they are."""
    from PIL import Image, ImageOps

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy() if image.dtype == torch.uint8 else image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CHW → HWC
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[:, :, 0]
        return Image.fromarray(array)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return image
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            import httpx

            image = Image.open(io.BytesIO(httpx.get(image, timeout=timeout, follow_redirects=True).content))
        elif os.path.isfile(image):
            image = open_image(image)
        else:
            try:
                data = base64.b64decode(image.split(",", 1)[1] if image.startswith("data:image/") else image,
                                        validate=True)
                image = Image.open(io.BytesIO(data))
            except Exception as error:
                raise ValueError(f"image {image[:80]!r} is not a file, a URL nor base64 image data") from error
    if not isinstance(image, Image.Image):
        raise TypeError(f"unsupported image type {type(image).__name__}")
    filename = getattr(image, "filename", None)
    image = ImageOps.exif_transpose(image)
    if filename and not getattr(image, "filename", None):
        image.filename = filename
    return image


def register_pipeline() -> None:
    """Register :class:`CertifiedImageClassificationPipeline` as ``"certified-image-classification"``."""
    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=CertifiedImageClassificationPipeline,
        pt_model=AutoModelForImageClassification,
        type="image",
    )
