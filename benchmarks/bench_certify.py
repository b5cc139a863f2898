"""Certification cost and bound tightness, measured side by side in one run (CPU).

For each backbone it prints:
* certify() time / plain logits forward time (same batch; interleaved repetitions; medians) and the
  fixed extra cost per call (content hash of the weights for the bound cache, the floating-point
  error bounds, float64 re-evaluation of grey rows). Untrained models on random inputs: for the cost on
  trained models and real data see bench_float_soundness.py,
* guaranteed bound / converged power-iteration estimate of Lip(pixels → features),
* seconds to compute the guaranteed bound from scratch (uncached).

Usage:  python benchmarks/bench_certify.py [--backbones gloro_2c2f liresnet_l12w512 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hf_gloro import GloRoConfig, GloRoForImageClassification  # noqa: E402

DEFAULTS = {  # backbone: (channels, image size, batch)
    "gloro_2c2f": (1, 28, 256),
    "gloro_4c3f": (1, 28, 256),
    "gloro_6c2f": (3, 32, 256),
    "gloro_8c2f": (3, 64, 64),
    "liresnet_l6w128": (3, 32, 64),
    "liresnet_l12w512": (3, 32, 16),
}


def plain_forward(model, x):
    with torch.no_grad():
        return model.head(model.backbone(model.normalization(x)))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, repeats: int, max_power_iterations: int) -> dict:
    channels, size, batch = DEFAULTS[name]
    model = GloRoForImageClassification(GloRoConfig(backbone=name, num_channels=channels, image_size=size)).eval()
    x = torch.rand(batch, channels, size, size)

    bound_seconds = timed(model.lipschitz_constant)  # first call: computes every per-layer bound
    print(f"  {name}: guaranteed bound computed in {bound_seconds:.1f}s", flush=True)
    bound = model.lipschitz_constant()  # cached from here on (weights unchanged)
    estimate = model.converge_power_iterates(tolerance=1e-7, max_iterations=max_power_iterations)

    plain_forward(model, x)
    model.certify(x)  # warm-up both paths
    plain, certify = [], []
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        plain.append(timed(lambda: plain_forward(model, x)))
        certify.append(timed(lambda: model.certify(x)))
    return {
        "backbone": name,
        "batch": batch,
        "forward_ms": 1e3 * statistics.median(plain),
        "certify_ms": 1e3 * statistics.median(certify),
        "certify_ratio": statistics.median(c / p for c, p in zip(certify, plain)),
        "overhead_ms": 1e3 * statistics.median(c - p for c, p in zip(certify, plain)),
        "bound": bound,
        "estimate": estimate,
        "tightness": bound / estimate,
        "bound_seconds": bound_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--max-power-iterations", type=int, default=2000,
                        help="cap for converging the estimate (liresnet_l12w512 uses 500: LiResNet's eval count)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores visible")
    header = (f"{'backbone':<18}{'batch':>6}{'forward ms':>12}{'certify ms':>12}{'certify/fwd':>13}{'extra ms':>10}"
              f"{'bound':>12}{'estimate':>12}{'bound/est':>11}{'bound s':>9}")
    print(header)
    for name in args.backbones:
        large = name.startswith("liresnet_l12")
        r = bench(name, max(3, args.repeats // 4) if large else args.repeats,
                  min(500, args.max_power_iterations) if large else args.max_power_iterations)
        print(f"{r['backbone']:<18}{r['batch']:>6}{r['forward_ms']:>12.2f}{r['certify_ms']:>12.2f}"
              f"{r['certify_ratio']:>13.4f}{r['overhead_ms']:>10.2f}{r['bound']:>12.5g}{r['estimate']:>12.5g}{r['tightness']:>11.5f}"
              f"{r['bound_seconds']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
