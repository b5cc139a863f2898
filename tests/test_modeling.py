"""The Hugging Face pair: config validation, outputs, bad input, save/load round trip, tampering, pipeline."""

import json

import numpy as np
import pytest
import timm
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

import hf_gloro
from hf_gloro import GloRoConfig, GloRoForImageClassification, InconsistentCheckpointError

BACKBONES = ["gloro_2c2f", "gloro_4c3f", "gloro_6c2f", "gloro_8c2f", "liresnet_l6w128", "liresnet_l12w256",
             "liresnet_l12w512", "liresnet_l18w256"]


def small_model(**overrides) -> GloRoForImageClassification:
    kwargs = dict(backbone="gloro_2c2f", num_channels=1, image_size=28, epsilon=0.3,
                  id2label={i: f"digit {i}" for i in range(10)})
    kwargs.update(overrides)
    return GloRoForImageClassification(GloRoConfig(**kwargs)).eval()


# --- timm registry ------------------------------------------------------------------------------------
def test_backbones_are_registered_in_timm():
    assert set(BACKBONES) <= set(timm.list_models("gloro*") + timm.list_models("liresnet*"))
    for name in BACKBONES:
        assert timm.models.get_pretrained_cfg(name) is not None


@pytest.mark.parametrize("name,in_chans,size", [("gloro_2c2f", 3, 28), ("gloro_6c2f", 1, 32),
                                                ("liresnet_l6w128", 3, 32), ("gloro_4c3f", 1, 28)])
def test_timm_create_model_features_and_bound(name, in_chans, size):
    backbone = timm.create_model(name, num_classes=0, in_chans=in_chans, img_size=size)
    features = backbone(torch.rand(2, in_chans, size, size))
    assert features.shape == (2, backbone.num_features)
    assert backbone.lipschitz_upper_bound() > 0
    classifier = timm.create_model(name, num_classes=7, in_chans=in_chans, img_size=size)
    assert classifier(torch.rand(2, in_chans, size, size)).shape == (2, 7)
    assert timm.data.resolve_data_config({}, model=classifier)["input_size"] == (in_chans, size, size)


# --- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,message", [
    (dict(epsilon=0.0), "epsilon"), (dict(epsilon=-0.1), "epsilon"), (dict(epsilon=float("nan")), "epsilon"),
    (dict(backbone="resnet_does_not_exist"), "is unknown"), (dict(backbone="resnet18", adaptation={"activation": "tanh"}), "activation"), (dict(image_mean=[0.1, 0.2]), "image_mean"),
    (dict(image_std=[0.0]), "image_std"), (dict(num_channels=0), "num_channels"),
    (dict(lipschitz_constant=-1.0), "lipschitz_constant"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        GloRoConfig(**bad)


def test_config_rejects_bad_types_and_norms():
    with pytest.raises(StrictDataclassFieldValidationError):
        GloRoConfig(norm="l1")  # "l2" and "linf" are the supported norms
    with pytest.raises(StrictDataclassFieldValidationError):
        GloRoConfig(power_iterations="5")
    with pytest.raises(StrictDataclassFieldValidationError):
        GloRoConfig(head_normalization="batchnorm")


def test_config_defaults_follow_the_backbone_and_auto_config():
    config = GloRoConfig(backbone="liresnet_l6w128", num_channels=3, image_size=32, epsilon=36 / 255)
    assert config.image_mean == [0.5, 0.5, 0.5] and config.image_std == [1.0, 1.0, 1.0]
    assert AutoConfig.for_model("gloro", epsilon=1).epsilon == 1


# --- forward / certify ----------------------------------------------------------------------------------
def test_forward_outputs_in_train_and_eval_mode():
    model = small_model()
    x, labels = torch.rand(5, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4])
    model.train()
    out = model(x, labels=labels)
    assert out.logits.shape == (5, 10) and out.gloro_logits.shape == (5, 11)
    assert out.certified is None and out.loss.requires_grad
    out.loss.backward()
    assert model.backbone.features[0].weight.grad is not None
    model.eval()
    out = model(x, labels=labels)
    assert out.certified.dtype == torch.bool and out.certified_radius.shape == (5,)
    certificate = model.certify(x)
    assert torch.equal(certificate.certified, out.certified)
    assert torch.equal(certificate.predictions, out.logits.argmax(-1))
    # ⊥ wins exactly when the point is not certified.
    assert torch.equal(out.gloro_logits.argmax(-1) != 10, out.certified)
    assert certificate.lipschitz_constant == model.lipschitz_constant()
    assert model.base_model is model.backbone


def test_certify_in_train_mode_uses_the_guaranteed_bound_and_leaves_state_alone():
    model = small_model().train()
    iterates = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("power_iterate")}
    certificate = model.certify(torch.rand(3, 1, 28, 28), epsilon=0.1)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in iterates.items())
    assert certificate.epsilon == 0.1
    assert certificate.lipschitz_constant >= model.converge_power_iterates()


@pytest.mark.parametrize("bad,error,message", [
    (torch.rand(1, 28, 28), ValueError, "shape"),
    (torch.rand(2, 3, 28, 28), ValueError, "channel"),
    (torch.rand(2, 1, 32, 32), ValueError, "size"),
    (torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8), TypeError, "floating-point"),
    (torch.full((2, 1, 28, 28), float("nan")), ValueError, "NaN"),
    (np.zeros((2, 1, 28, 28), dtype=np.float32), TypeError, "torch.Tensor"),
])
def test_bad_input_gets_a_clear_error(bad, error, message):
    model = small_model()
    with pytest.raises(error, match=message):
        model(bad)
    with pytest.raises(error, match=message):
        model.certify(bad)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("inf")])
def test_bad_epsilon_is_refused(eps):
    model = small_model()
    with pytest.raises(ValueError, match="epsilon"):
        model.certify(torch.rand(1, 1, 28, 28), epsilon=eps)
    with pytest.raises(ValueError, match="epsilon"):
        model(torch.rand(1, 1, 28, 28), epsilon=eps)


def test_normalisation_is_folded_into_the_bound():
    plain = small_model()
    scaled = small_model(image_std=[0.25])
    scaled.load_state_dict(plain.state_dict(), strict=False)
    assert scaled.lipschitz_constant() == pytest.approx(4 * plain.lipschitz_constant(), rel=1e-9)


# --- persistence ----------------------------------------------------------------------------------------
def _train_a_little(model, steps=3):
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    shape = (8, model.config.num_channels, model.config.image_size, model.config.image_size)
    for _ in range(steps):
        loss = model(torch.rand(shape), labels=torch.randint(0, 10, (8,))).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("overrides", [
    dict(head_normalization="lln", image_mean=[0.13], image_std=[0.31]),
    dict(backbone="liresnet_l6w128", num_channels=3, image_size=32, epsilon=36 / 255, head_normalization="lln"),
], ids=["gloro_2c2f", "liresnet_l6w128"])
def test_save_and_auto_load_round_trip_bit_for_bit(tmp_path, overrides):
    model = _train_a_little(small_model(**overrides))
    model.save_pretrained(tmp_path)
    channels, size = model.config.num_channels, model.config.image_size
    hf_gloro.gloro_image_processor(channels, size).save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["lipschitz_constant"] == model.lipschitz_constant()
    assert recorded["model_type"] == "gloro" and recorded["epsilon"] == model.config.epsilon

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded, GloRoForImageClassification) and not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert any(k.endswith("power_iterate") for k in original)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    x = torch.rand(16, channels, size, size)
    a, b = model(x), loaded(x)
    # The weights are bit-identical (above); float32 BLAS results may still differ in their last bits between two
    # copies (oneDNN/MKL kernels depend on memory alignment). The decided predictions are exact, so they and
    # the certificates agree; logits and radii agree to rounding.
    assert torch.equal(a.logits.argmax(-1), b.logits.argmax(-1))
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.gloro_logits, b.gloro_logits, rtol=1e-5, atol=1e-6)
    ca, cb = model.certify(x), loaded.certify(x)
    assert torch.equal(ca.predictions, cb.predictions)
    torch.testing.assert_close(ca.radius, cb.radius, rtol=1e-4, atol=1e-6)
    assert torch.equal(ca.certified, cb.certified) or ((ca.radius - model.config.epsilon).abs() < 1e-4).any()
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), hf_gloro.GloRoImageProcessor)


def test_lowered_recorded_bound_is_refused(tmp_path):
    small_model().save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["lipschitz_constant"] *= 0.99
    config_path.write_text(json.dumps(config))
    with pytest.raises(InconsistentCheckpointError, match="tampered or inconsistent"):
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_changed_norm_is_refused_unless_the_recorded_bound_is_reset(tmp_path):
    """An L2 checkpoint loaded as L∞ has a larger bound than it records: refused with a message that names the
    folder and the way out; with ``lipschitz_constant=None`` it loads and certifies in L∞."""
    import re

    small_model().save_pretrained(tmp_path)
    with pytest.raises(InconsistentCheckpointError, match=re.escape(str(tmp_path)) + ".*lipschitz_constant=None"):
        AutoModelForImageClassification.from_pretrained(tmp_path, norm="linf")
    model = AutoModelForImageClassification.from_pretrained(tmp_path, norm="linf", lipschitz_constant=None)
    size, channels = model.config.image_size, model.config.num_channels
    assert model.certify(torch.rand(2, channels, size, size)).norm == "linf"


def test_weights_scaled_after_saving_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    small_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    key = next(k for k in weights if k.endswith("features.0.weight"))
    weights[key] = weights[key] * 1.5
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InconsistentCheckpointError):
        GloRoForImageClassification.from_pretrained(tmp_path)


def test_pipeline_classifies_real_looking_images(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    hf_gloro.gloro_image_processor(1, 28).save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray((np.random.rand(28, 28) * 255).astype("uint8"), "L")
    result = classifier(image, top_k=3)
    assert len(result) == 3 and result[0]["label"].startswith("digit")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None, None]
    expected = model.config.id2label[int(model(pixels).logits.argmax())]
    assert result[0]["label"] == expected


def test_register_for_auto_class_saves_code_that_loads_without_hf_gloro(tmp_path):
    import os
    import subprocess
    import sys

    model = small_model()
    try:
        GloRoForImageClassification.register_for_auto_class("AutoModelForImageClassification")
        model.save_pretrained(tmp_path)
    finally:
        GloRoForImageClassification._auto_class = None
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_gloro.GloRoForImageClassification"
    x = torch.rand(3, 1, 28, 28)
    torch.save({"x": x, "logits": model(x).logits, "radius": model.certify(x).radius}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
class BlockHfGloro:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'hf_gloro':
            raise ImportError('hf_gloro is not installed here')
sys.meta_path.insert(0, BlockHfGloro())
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
expected = torch.load({str(tmp_path / 'expected.pt')!r})
assert 'hf_gloro' not in sys.modules and type(model).__module__.startswith('transformers_modules')
assert torch.equal(model(expected['x']).logits, expected['logits'])
assert torch.equal(model.certify(expected['x']).radius, expected['radius'])
print('REMOTE-CODE-OK')
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert "REMOTE-CODE-OK" in result.stdout, result.stderr[-2000:]


def test_dataset_pixels_and_image_processor_agree_bit_for_bit():
    from hf_gloro.data import images_to_pixels

    rng = np.random.default_rng(0)
    for channels, size, mode in [(1, 28, "L"), (3, 32, "RGB")]:
        shape = (size, size) if channels == 1 else (size, size, 3)
        images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(3)]
        processed = hf_gloro.gloro_image_processor(channels, size)(images, return_tensors="pt")["pixel_values"]
        assert torch.equal(images_to_pixels(images, channels, size), processed)


def test_rgb_images_of_gray_digits_give_the_same_pixels_as_gray_ones():
    # pipeline() opens every image as RGB: a 1-channel model must see exactly the original gray pixels.
    rng = np.random.default_rng(1)
    gray = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L")
    processor = hf_gloro.gloro_image_processor(1, 28)
    from_rgb = processor(gray.convert("RGB"), return_tensors="pt")["pixel_values"]
    assert torch.equal(from_rgb, processor(gray, return_tensors="pt")["pixel_values"])
