"""What a certificate rests on cannot go stale or be silently wrong: content-hash caches that see every weight
write and every setting, strict composition (only the package's own chain), forward/hook checks, reduced
precision refused, inputs outside [0, 1] refused, strict loading and strict configs.

Each of the first four groups reproduces a way an earlier release issued certificates that a real perturbation
broke (issue #7: stale caches after `.data` writes, settings ignored by the cache, `nn.Sequential` subclasses
bounded as chains, autocast/fp16 silently certified)."""

import copy
import json
import logging
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import hf_gloro
from hf_gloro import GloRoConfig, GloRoForImageClassification
from hf_gloro.lipschitz import LipschitzConv2d, LipschitzSequential, MinMax, UnknownLipschitzError


def small_liresnet(**config):
    values = dict(backbone="liresnet_l6w128", num_channels=3, image_size=16, epsilon=0.1,
                  backbone_kwargs={"width": 8, "depth": 2, "neck_features": 16}, head_normalization="lln")
    values.update(config)
    return GloRoForImageClassification(GloRoConfig(**values)).eval()


def small_2c2f(**config):
    return GloRoForImageClassification(GloRoConfig(backbone="gloro_2c2f", image_size=12, epsilon=0.3, **config)).eval()


def clear_caches(model: nn.Module) -> None:
    for module in model.modules():
        for key in [k for k in vars(module) if k.startswith("_cache_")]:
            del module.__dict__[key]


def fresh(model: nn.Module) -> tuple[float, torch.Tensor]:
    """``(k, K)`` recomputed from scratch on a copy with every cache removed."""
    clone = copy.deepcopy(model)
    clear_caches(clone)
    return clone.lipschitz_constant(), clone.margin_lipschitz_constants()


def assert_current(model):
    bound, constants = model.lipschitz_constant(), model.margin_lipschitz_constants()
    fresh_bound, fresh_constants = fresh(model)
    assert bound == fresh_bound
    assert torch.equal(constants, fresh_constants)


# --- 1. caches see every write ----------------------------------------------------------------------------------

def _balanced_exponent_shift(weight):
    rows = weight.shape[0]
    half = rows // 2
    weight.data[:half] *= 4.0
    weight.data[half: 2 * half] /= 4.0


def _permute_entries(weight):
    flat = weight.data.flatten()
    weight.data.copy_(flat[torch.randperm(flat.numel())].view_as(weight))


def _flip_signs(weight):
    """Flip as many positive entries to negative as negative ones to positive (a bit-pattern sum is blind)."""
    flat = weight.data.view(-1)
    positive, negative = (flat > 0).nonzero().squeeze(1), (flat < 0).nonzero().squeeze(1)
    count = min(len(positive), len(negative)) // 2
    flat[positive[:count]] *= -1
    flat[negative[:count]] *= -1


def _scale_by_two(weight):
    weight.data.mul_(2.0)


@pytest.mark.parametrize("write", [_balanced_exponent_shift, _permute_entries, _flip_signs, _scale_by_two])
def test_a_write_through_data_is_seen_by_the_cached_bound(write):
    model = small_2c2f()
    conv = model.backbone.features[0]
    with torch.no_grad():  # a non-trivial spectrum, so that row operations change the norm
        conv.weight.mul_(torch.linspace(0.2, 3.0, conv.weight.shape[0]).view(-1, 1, 1, 1))
    before = model.lipschitz_constant()
    version = conv.weight._version
    write(conv.weight)
    assert conv.weight._version == version  # `.data` writes bypass the version counter
    assert_current(model)
    assert model.lipschitz_constant() != before


def test_property_random_mutations_of_weights_and_settings_keep_the_bound_current():
    rng = random.Random(0)
    model = small_liresnet()
    model.lipschitz_constant()
    tensors = [p for p in model.parameters()]
    mutations = [_balanced_exponent_shift, _permute_entries, _flip_signs, _scale_by_two]
    residual = [m for m in model.modules() if type(m).__name__ == "LinearResidualConv2d"]
    for step in range(25):
        choice = rng.random()
        if choice < 0.6:
            tensor = rng.choice([t for t in tensors if t.ndim >= 1 and t.shape[0] >= 2])
            rng.choice(mutations)(tensor)
        elif choice < 0.8:
            block = rng.choice(residual)
            block.residual_scale = block.residual_scale * rng.choice([0.5, 3.0])
        else:
            model.head.normalize_rows = not model.head.normalize_rows
        assert_current(model)


def test_settings_the_forward_reads_invalidate_the_cache():
    model = small_liresnet()
    x = torch.rand(4, 3, 16, 16)
    model.certify(x)
    k0, K0 = model.lipschitz_constant(), model.margin_lipschitz_constants().clone()
    block = next(m for m in model.modules() if type(m).__name__ == "LinearResidualConv2d")
    with torch.no_grad():
        block.weight.normal_()  # make the residual branch matter
    model.lipschitz_constant()
    k1 = model.lipschitz_constant()
    block.residual_scale *= 4
    assert model.lipschitz_constant() > k1
    assert_current(model)
    model.head.normalize_rows = False
    with torch.no_grad():
        model.head.weight.mul_(5.0)
    assert not torch.equal(model.margin_lipschitz_constants(), K0)
    assert_current(model)
    assert k0 > 0


def test_pooling_settings_the_bound_does_not_model_are_refused():
    from hf_gloro.lipschitz import LipschitzAvgPool2d

    pool = LipschitzAvgPool2d(2, input_size=8)
    assert pool.lipschitz_upper_bound() == pytest.approx(0.5, rel=1e-5)
    pool.divisor_override = 1  # the forward would now sum, not average: 4x the bound
    with pytest.raises(ValueError, match="divisor_override"):
        pool.lipschitz_upper_bound()


# --- 2. no silent composition -----------------------------------------------------------------------------------

class ResidualBlock(nn.Sequential):
    """The common style: a Sequential whose forward adds a skip connection (Lipschitz ≤ 2, not 1)."""

    def forward(self, x):
        return x + super().forward(x)


class CustomChain(LipschitzSequential):
    def forward(self, x):
        return x + super().forward(x)


class DoubledConv(LipschitzConv2d):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("make", [
    lambda: ResidualBlock(LipschitzConv2d(16, 16, 3, 6, padding=1), MinMax()),
    lambda: nn.Sequential(LipschitzConv2d(16, 16, 3, 6, padding=1), MinMax()),
    lambda: CustomChain(LipschitzConv2d(16, 16, 3, 6, padding=1), MinMax()),
    lambda: DoubledConv(16, 16, 3, 6, padding=1),
    lambda: nn.Identity(),
])
def test_only_the_packages_own_chain_is_bounded(make):
    model = small_2c2f()
    model.backbone.features.insert(2, make())  # after the first conv + activation: 16 channels at 6×6
    x = torch.rand(2, 1, 12, 12)
    model.backbone(x)  # the network itself still runs
    with pytest.raises(UnknownLipschitzError, match=r"ResidualBlock|Sequential|CustomChain|DoubledConv|Identity"):
        model.lipschitz_constant()
    with pytest.raises(UnknownLipschitzError):
        model.certify(x)
    with pytest.raises(UnknownLipschitzError):
        model.eval()(x)
    with pytest.raises(UnknownLipschitzError):  # nor can it be trained with a GloRo bound
        model.train()(x)


def test_a_backbone_with_its_own_forward_is_refused():
    model = small_2c2f()
    original = type(model.backbone)

    class Scaled(original):
        def forward(self, x):
            return 3 * super().forward(x)

    model.backbone.__class__ = Scaled
    with pytest.raises(UnknownLipschitzError, match="overrides forward"):
        model.certify(torch.rand(1, 1, 12, 12))


def test_forward_hooks_refuse_certificates_until_removed():
    model = small_2c2f()
    x = torch.rand(3, 1, 12, 12)
    handle = model.backbone.features[0].register_forward_hook(lambda module, inputs, output: output * 10)
    with pytest.raises(hf_gloro.CertificationRefusedError, match="hooks"):
        model.certify(x)
    with pytest.raises(hf_gloro.CertificationRefusedError):
        model(x)
    handle.remove()
    pre = model.head.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 10,))
    with pytest.raises(hf_gloro.CertificationRefusedError):
        model.certify(x)
    pre.remove()
    assert model.certify(x).radius.shape == (3,)


# --- 3. reduced precision is never certified --------------------------------------------------------------------

def test_autocast_and_half_precision_are_refused():
    model = small_2c2f()
    x = torch.rand(4, 1, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(hf_gloro.ReducedPrecisionError, match="autocast"):
            model.certify(x)
        with pytest.warns(UserWarning, match="no certificate"):
            output = model(x)
        assert output.certified is None and output.certified_radius is None
        # The explicit way out: certify with autocast disabled.
        with torch.autocast("cpu", enabled=False):
            assert model.certify(x).radius.dtype == torch.float64
    with pytest.raises(hf_gloro.ReducedPrecisionError, match="bfloat16"):
        copy.deepcopy(model).to(torch.bfloat16).certify(x.bfloat16())
    with pytest.raises(hf_gloro.ReducedPrecisionError, match="float16"):
        model.certify(x.half())


def test_tf32_and_cudnn_switches_are_set_while_certifying_and_restored():
    from hf_gloro.lipschitz.numerics import _fp32_precision_leaves, certification_numerics

    leaves = _fp32_precision_leaves()
    before = [leaf.fp32_precision for leaf in leaves]
    cudnn = torch.backends.cudnn.enabled
    with certification_numerics():
        assert all(leaf.fp32_precision == "ieee" for leaf in leaves)
        assert torch.backends.cudnn.enabled is False
    assert [leaf.fp32_precision for leaf in leaves] == before
    assert torch.backends.cudnn.enabled == cudnn


# --- inputs, loading, configs ------------------------------------------------------------------------------------

def test_pixels_outside_the_unit_box_are_refused_where_certificates_are_issued():
    model = small_2c2f()
    x = torch.rand(2, 1, 12, 12)
    with pytest.raises(ValueError, match="0–255"):
        model.certify(x * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(x - 0.5)
    model.train()(x * 255)  # training forwards stay permissive (augmentation)
    model.eval()
    model.config.check_input_range = False
    assert model.certify(x * 255).radius.shape == (2,)


def test_checkpoints_with_missing_or_unexpected_tensors_are_refused(tmp_path):
    model = small_2c2f()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    for name, mutate in {"missing": lambda s: s.pop("head.weight"),
                         "unexpected": lambda s: s.__setitem__("head.extra", torch.zeros(3))}.items():
        broken = dict(state)
        mutate(broken)
        save_file(broken, weights, metadata={"format": "pt"})
        with pytest.raises(hf_gloro.InconsistentCheckpointError, match=name):
            GloRoForImageClassification.from_pretrained(tmp_path)
    save_file(state, weights, metadata={"format": "pt"})
    loaded, info = GloRoForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and loaded.lipschitz_constant() == model.lipschitz_constant()


def test_unknown_config_arguments_are_errors_and_unknown_file_keys_warn(tmp_path, caplog):
    with pytest.raises(TypeError, match="epsilonn.*did you mean 'epsilon'"):
        GloRoConfig(backbone="gloro_2c2f", epsilonn=0.5)
    config = GloRoConfig(backbone="gloro_2c2f", epsilon=0.5)
    config.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["epsilonn"] = 0.7
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        loaded = GloRoConfig.from_pretrained(tmp_path)
    assert loaded.epsilon == 0.5
    assert "epsilonn" in caplog.text
