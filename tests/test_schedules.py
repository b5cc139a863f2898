"""ε / λ schedules: values at chosen optimizer steps, ratio-space shape, multiplier, LR decay-after-half."""

import math

import pytest

from hf_gloro.schedules import SCHEDULES, Schedule, decay_after_half, training_epsilon


def test_fixed_is_one_everywhere():
    schedule = Schedule("fixed", start_fraction=0.01)
    assert [schedule(step, 100) for step in (0, 1, 50, 99, 100, 1000)] == [1.0] * 6


@pytest.mark.parametrize("step, expected", [(0, 0.1), (25, 0.1 + 0.9 * 0.5), (50, 1.0), (75, 1.0), (100, 1.0)])
def test_linear_half(step, expected):
    assert Schedule("linear_half", start_fraction=0.1)(step, 100) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (10, 0.25), (20, 0.5), (40, 1.0)])
def test_linear_full_from_zero(step, expected):
    assert Schedule("linear", start_fraction=0.0)(step, 40) == pytest.approx(expected, abs=1e-12)


def test_log_half_values():
    s = 0.01
    schedule = Schedule("log_half", start_fraction=s)
    # f(u) = ln((e − e^s)·u + e^s), u = step / (total / 2)
    expected_quarter = math.log((math.e - math.exp(s)) * 0.5 + math.exp(s))
    assert schedule(0, 200) == pytest.approx(s, abs=1e-12)
    assert schedule(50, 200) == pytest.approx(expected_quarter, abs=1e-12)
    assert expected_quarter == pytest.approx(0.6228, abs=1e-4)  # hand value: ln(0.5·1.7082 + 1.0101)
    assert schedule(100, 200) == pytest.approx(1.0, abs=1e-12)
    assert schedule(199, 200) == 1.0


def test_log_is_concave_and_above_linear():
    log, linear = Schedule("log", 0.01), Schedule("linear", 0.01)
    values = [log(step, 100) for step in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone
    assert all(log(step, 100) > linear(step, 100) for step in range(1, 100))  # concave ramp


def test_log_shape_does_not_depend_on_epsilon_magnitude():
    # Ratio-space interpolation: ε_train(t)/ε_train(end) is the same for ε = 0.141 and ε = 1.58 (unlike the
    # TF library, whose log interpolation after scaling is nearly linear for small ε).
    schedule = Schedule("log_half", 0.01)
    for step in (0, 10, 25, 40):
        small = training_epsilon(36 / 255, step, 100, schedule) / (36 / 255)
        large = training_epsilon(1.58, step, 100, schedule) / 1.58
        assert small == pytest.approx(large, rel=1e-12)
    assert training_epsilon(36 / 255, 25, 100, schedule) / (36 / 255) > 0.6  # clearly concave, not ~0.5


def test_training_epsilon_multiplier_and_schedule():
    schedule = Schedule("linear_half", 0.1)
    assert training_epsilon(0.3, 100, 100, schedule, multiplier=1.5) == pytest.approx(0.45)
    assert training_epsilon(0.3, 0, 100, schedule, multiplier=1.5) == pytest.approx(0.045)
    assert training_epsilon(0.3, 0, 100, Schedule("fixed"), multiplier=1.5) == pytest.approx(0.45)
    with pytest.raises(ValueError):
        training_epsilon(0.3, 0, 100, schedule, multiplier=0.0)


def test_ramp_fraction_override_and_unknown_total():
    schedule = Schedule("linear", 0.0, ramp_fraction=0.2)
    assert schedule(10, 100) == pytest.approx(0.5)
    assert schedule(20, 100) == 1.0
    assert Schedule("log_half", 0.01)(5, 0) == 1.0  # unknown length: final value


@pytest.mark.parametrize("kwargs", [dict(name="cosine"), dict(name="linear", start_fraction=1.5),
                                    dict(name="linear", ramp_fraction=0.0)])
def test_invalid_schedules(kwargs):
    with pytest.raises(ValueError):
        Schedule(**kwargs)


def test_known_names():
    assert {"fixed", "linear_half", "log_half"} <= set(SCHEDULES)


def test_decay_after_half():
    assert decay_after_half(0.0, 1e-3) == 1.0
    assert decay_after_half(0.5, 1e-3) == 1.0
    assert decay_after_half(0.75, 1e-3) == pytest.approx(math.sqrt(1e-3))
    assert decay_after_half(1.0, 1e-3) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        decay_after_half(0.7, 0.0)
