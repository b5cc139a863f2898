"""Time of the guaranteed Lipschitz bound of every native backbone, and its tightness.

For each backbone (``timm.create_model(name, num_classes=0)``, untrained weights, fixed seed) it measures

* seconds of ``backbone.lipschitz_upper_bound()`` from scratch (a fresh model per repetition, so no cache)
  at 1 and at 2 torch threads, repetitions interleaved (threads alternate, so load changes hit both alike),
  medians quoted, with the 1-minute load average around each timing (the CPU is shared);
* the old bound's time (``--old-rev``, default the commit before the fast bound), where cheap;
* guaranteed bound / converged power-iteration estimate
  (``hf_gloro.lipschitz.converge_power_iterates(backbone.features, ...)``; the estimate is from below).

Writes ``benchmarks/results/bench_bounds.md`` and ``.json``.

Usage:  python benchmarks/bench_bounds.py [--backbones liresnet_l12w512 ...] [--repeats 3] [--old all|small|none]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

import hf_gloro  # noqa: E402,F401  (registers the backbones)
import hf_gloro.lipschitz.conv as conv_module  # noqa: E402
from hf_gloro.lipschitz import converge_power_iterates  # noqa: E402

BACKBONES = ["gloro_2c2f", "gloro_4c3f", "gloro_6c2f", "gloro_8c2f", "liresnet_l6w128", "liresnet_l12w256",
             "liresnet_l12w512", "liresnet_l18w256", "liresnet_l12w588"]
LARGE = {"liresnet_l12w512", "liresnet_l12w256", "liresnet_l18w256", "liresnet_l12w588"}
ROOT = Path(__file__).resolve().parents[1]


def load_old_bound(rev: str):
    """``conv2d_spectral_norm_bound`` as it was at ``rev`` (imported as a sibling module, for timing only)."""
    source = subprocess.run(["git", "show", f"{rev}:hf_gloro/lipschitz/spectral_bounds.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_spectral_bounds.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("hf_gloro.lipschitz._old_spectral_bounds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.conv2d_spectral_norm_bound


def fresh(name: str):
    torch.set_num_threads(1)  # the initialisation (QR) must not depend on the thread count of the last run
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=0).eval()


def timed_bound(name: str, threads: int, bound_fn=None) -> dict:
    model = fresh(name)
    torch.set_num_threads(threads)
    original = conv_module.conv2d_spectral_norm_bound
    if bound_fn is not None:
        conv_module.conv2d_spectral_norm_bound = bound_fn
    load_before = os.getloadavg()[0]
    try:
        start = time.perf_counter()
        bound = model.lipschitz_upper_bound()
        seconds = time.perf_counter() - start
    finally:
        conv_module.conv2d_spectral_norm_bound = original
    return {"seconds": seconds, "bound": bound, "load": (load_before + os.getloadavg()[0]) / 2}


def bench(name: str, repeats: int, old_fn, max_power_iterations: int, known_estimate: float | None = None) -> dict:
    runs = {1: [], 2: []}
    for _ in range(repeats):
        for threads in (1, 2):
            runs[threads].append(timed_bound(name, threads))
            print(f"  {name} {threads}t: {runs[threads][-1]['seconds']:.2f}s "
                  f"(load {runs[threads][-1]['load']:.1f})", flush=True)
    bounds = {r["bound"] for rs in runs.values() for r in rs}
    result = {
        "backbone": name,
        "seconds_1t": statistics.median(r["seconds"] for r in runs[1]),
        "seconds_2t": statistics.median(r["seconds"] for r in runs[2]),
        "runs": runs,
        "bound": max(bounds),
        "bound_reproducible": len(bounds) == 1,
    }
    if old_fn is not None:
        old = timed_bound(name, 2, old_fn)
        result.update(old_seconds_2t=old["seconds"], old_bound=old["bound"], old_load=old["load"])
        print(f"  {name} old 2t: {old['seconds']:.2f}s (load {old['load']:.1f})", flush=True)
    if known_estimate is not None:  # same seed, same weights: the estimate does not depend on the bound code
        estimate = known_estimate
    else:
        torch.set_num_threads(2)
        model = fresh(name)
        with torch.no_grad():
            estimate = converge_power_iterates(model.features, tolerance=1e-7, max_iterations=max_power_iterations)
    result.update(estimate=estimate, tightness=result["bound"] / estimate, estimate_reused=known_estimate is not None)
    return result


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Guaranteed bound: time and tightness per backbone",
        "",
        f"`{meta['command']}` — torch {meta['torch']}, {meta['cores']} cores visible (shared with other jobs), "
        f"{meta['repeats']} interleaved repetitions per thread count, medians; load = 1-min load average.",
        "",
        "| backbone | bound s, 1 thread | bound s, 2 threads | load (1t / 2t) | old bound s, 2 threads (load) "
        "| bound | converged estimate | bound / estimate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        load1 = statistics.median(x["load"] for x in r["runs"][1])
        load2 = statistics.median(x["load"] for x in r["runs"][2])
        old = f"{r['old_seconds_2t']:.2f} ({r['old_load']:.1f})" if "old_seconds_2t" in r else "—"
        lines.append(f"| {r['backbone']} | {r['seconds_1t']:.2f} | {r['seconds_2t']:.2f} | {load1:.1f} / {load2:.1f} "
                     f"| {old} | {r['bound']:.9g} | {r['estimate']:.6g} | {r['tightness']:.5f} |")
    lines += ["", f"Bounds identical across all repetitions and thread counts: "
              f"{all(r['bound_reproducible'] for r in results)}."]
    reused = [r["backbone"] for r in results if r.get("estimate_reused")]
    if reused:
        lines += [f"Converged estimates reused from `{meta['estimates_from']}` (same seeded weights): "
                  f"{', '.join(reused)}."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=BACKBONES, choices=BACKBONES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old", choices=["all", "small", "none"], default="small",
                        help="time the old bound (2 threads, once): for every backbone, the small ones, or none")
    parser.add_argument("--old-rev", default="4f0c00d")
    parser.add_argument("--max-power-iterations", type=int, default=2000)
    parser.add_argument("--estimates-from", default=None,
                        help="reuse the converged estimates of an earlier results .json (they depend only on the "
                             "seeded initial weights; converging them takes most of the run)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bench_bounds"))
    args = parser.parse_args()
    old_fn = load_old_bound(args.old_rev) if args.old != "none" else None
    meta = {"command": "python benchmarks/bench_bounds.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
            "cores": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "repeats": args.repeats, "old_rev": args.old_rev,
            "start": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": os.getloadavg()}
    known = {}
    if args.estimates_from:
        known = {r["backbone"]: r["estimate"] for r in json.loads(Path(args.estimates_from).read_text())["results"]}
    meta["estimates_from"] = args.estimates_from
    results = []
    for name in args.backbones:
        use_old = old_fn if (args.old == "all" or (args.old == "small" and name not in LARGE)) else None
        iterations = min(500, args.max_power_iterations) if name in LARGE else args.max_power_iterations
        results.append(bench(name, args.repeats, use_old, iterations, known.get(name)))
        r = results[-1]
        print(f"{name}: {r['seconds_1t']:.2f}s (1t) {r['seconds_2t']:.2f}s (2t), bound/estimate "
              f"{r['tightness']:.5f}", flush=True)
        meta["load_end"] = os.getloadavg()
        Path(args.output + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        Path(args.output + ".md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
