"""Shared test set-up: offline Hub, deterministic seeds, one torch thread (2-core CI machines)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib

import pytest
import torch

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on a
    shared 2-core machine two OpenMP threads made dense SVDs, float64 convolutions and short trainings many times
    slower in CPU time (spinning threads under contention)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The shared datasets (Hub layout). Missing: a skip on a developer machine, a failure in CI (``CI`` set),
    so that CI cannot stay green by skipping every test that needs real data."""
    if not (SHARED_DATA / "mnist").is_dir():
        message = f"shared datasets not found at {SHARED_DATA}"
        if _in_ci():
            pytest.fail(f"{message}; CI needs them (unset CI to skip these tests locally)", pytrace=False)
        pytest.skip(message)
    return SHARED_DATA
