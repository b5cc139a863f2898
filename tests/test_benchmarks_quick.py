"""Smoke tests of the comparison benchmarks: each script's ``--quick`` mode runs end to end (subprocess) and writes
its JSON with the expected keys and sane values.

The benchmarks need the benchmark-only extras (``benchmarks/requirements-compare.txt``: auto_LiRPA installed
without its dependency pins, deel-torchlip) and the MNIST copy in ``../shared/data``. Without them these tests
skip locally and fail under ``CI=1`` (CI installs the extras, so a missing one is a broken CI).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DATA = ROOT.parent / "shared" / "data"
IN_CI = os.environ.get("CI", "") not in ("", "0", "false")


def _require(modules: list[str]) -> None:
    # Presence only (find_spec): importing auto_LiRPA here would apply its shims and its global TorchScript
    # settings to this test process; the benchmark subprocesses import it themselves.
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # parent package missing
            found = False
        if not found:
            missing.append(name)
    if not (DATA / "mnist").is_dir():
        missing.append(f"MNIST data in {DATA}")
    if missing:
        message = f"benchmark extras missing: {', '.join(missing)} (see benchmarks/requirements-compare.txt)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _run_quick(script: str, out_dir: Path, timeout: int = 900) -> dict:
    # ~1 minute each on an idle 2-core machine; the timeout only guards against a hang on a loaded one.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_GLORO_BENCH_CACHE=str(out_dir / "cache"))
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--threads", "1",
                           "--dataset_dir", str(DATA), "--out-dir", str(out_dir)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = script.removeprefix("bench_").removesuffix(".py") + "_quick"
    assert (out_dir / f"{stem}.md").read_text().startswith("# ")
    return json.loads((out_dir / f"{stem}.json").read_text())


def _fraction(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _machine_ok(results: dict) -> None:
    machine = results["machine"]
    assert machine["torch_threads"] == 1
    assert len(machine["load_average_1_5_15"]) == 3


def test_local_bounds_quick(tmp_path):
    _require(["auto_LiRPA", "appdirs"])
    results = _run_quick("bench_local_bounds.py", tmp_path)
    _machine_ok(results)
    assert results["quick"] is True
    names = [model["name"] for model in results["models"]]
    assert names[0] == "GloRo-trained" and names[1].startswith("cross-entropy-trained")
    for model in results["models"]:
        assert model["export_max_abs_error"] < 1e-3  # the exported plain network is the model
        rows = {row["method"]: row for row in model["rows"]}
        assert set(rows) == {"GloRo (model.certify)", "auto_LiRPA IBP", "auto_LiRPA CROWN", "auto_LiRPA alpha-CROWN"}
        gloro = rows["GloRo (model.certify)"]
        for row in rows.values():
            assert "error" not in row, row
            assert _fraction(row["certified"]) and _fraction(row["vra"]) and row["vra"] <= row["certified"]
            assert row["images_per_s"] > 0
        for name in ("auto_LiRPA CROWN", "auto_LiRPA alpha-CROWN"):
            row = rows[name]
            for key in ("both", "local_only", "gloro_only", "union", "gloro_certified_same_images"):
                assert _fraction(row[key]), (name, key)
            assert math.isclose(row["union"], row["both"] + row["local_only"] + row["gloro_only"], abs_tol=1e-9)
            assert gloro["images_per_s"] > 10 * row["images_per_s"]  # our certificate is far cheaper than CROWN
    # On the GloRo-trained model, GloRo certifies most of the few test points.
    assert results["models"][0]["rows"][0]["certified"] > 0.5


def test_certified_training_quick(tmp_path):
    _require(["auto_LiRPA", "appdirs"])
    results = _run_quick("bench_certified_training.py", tmp_path)
    _machine_ok(results)
    runs = {run["method"]: run for run in results["runs"]}
    assert set(runs) == {"GloRo", "CROWN-IBP", "plain CE"}
    for method, run in runs.items():
        assert "error" not in run, run
        assert run["steps"] > 0 and run["train_seconds"] >= results["budget"]
        assert run["seconds_per_epoch"] > 0 and run["mean_step_s"] > 0
        assert len(run["curve"]) >= 2
        for point in run["curve"]:
            assert _fraction(point["clean_accuracy"]) and _fraction(point["vra"])
            assert point["vra"] <= point["clean_accuracy"]
    assert "full_crown_check" in runs["CROWN-IBP"]["final"]
    assert (tmp_path / "certified_training_quick.png").stat().st_size > 1000
    # A few seconds of GloRo training already certify some points at ε = 0.3.
    assert runs["GloRo"]["final"]["vra"] > 0.1


def test_torchlip_quick(tmp_path):
    _require(["deel.torchlip"])
    results = _run_quick("bench_torchlip.py", tmp_path)
    _machine_ok(results)
    final = results["torchlip"]["final"]
    for key in ("clean_accuracy", "vra", "vra_guaranteed"):
        assert _fraction(final[key]), key
    assert final["vra"] <= final["clean_accuracy"] and final["vra_guaranteed"] <= final["clean_accuracy"]
    # The guaranteed bound of the exported torchlip layers is finite and positive.
    assert 0 < final["body_bound"] < 10
    gloro = results["gloro"]
    assert _fraction(gloro["vra"]) and gloro["certify_images_per_s"] > 0 and gloro["train_images_per_s"] > 0
