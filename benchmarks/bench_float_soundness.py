#!/usr/bin/env python
"""The cost of float-sound certificates: VRA lost, rows re-evaluated in float64, and certify()/forward.

    python benchmarks/bench_float_soundness.py MODEL_DIR --dataset ylecun/mnist --dataset_dir ../shared/data \
        [--limit 2000] [--batch 256] [--threads 1] [--repeats 7] [--json out.json]

For a saved GloRo model and a test split, in one run:

* **exact-arithmetic VRA**: the certificate of the previous releases (margins of the float32 logits against
  ``ε·K_ji`` only, i.e. pretending the forward pass were exact);
* **float-sound VRA**: ``model.certify`` (float32 rounding bounded, grey rows re-evaluated in float64);
* the fraction of rows ``certify`` re-evaluated in float64;
* ``certify()/forward`` at the given batch size: medians over interleaved repetitions of a plain float32
  forward (``head(backbone(normalization(x)))`` under ``no_grad``) and of ``certify``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import hf_gloro
from hf_gloro.data import image_column, images_to_pixels, label_column, load_image_dataset
from hf_gloro.lipschitz import certify_logits


def load_split(name: str, dataset_dir: str | None, split: str, channels: int, size: int, limit: int):
    data = load_image_dataset(name, split, dataset_dir=dataset_dir)
    data = data.select(range(min(limit, len(data))))
    return images_to_pixels(data[image_column(data)], channels, size), torch.tensor(data[label_column(data)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--dataset", default="ylecun/mnist")
    parser.add_argument("--dataset_dir", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = hf_gloro.GloRoForImageClassification.from_pretrained(args.model).eval()
    config = model.config
    x, y = load_split(args.dataset, args.dataset_dir, args.split, config.num_channels, config.image_size, args.limit)
    epsilon = float(config.epsilon)

    exact_correct = sound_correct = float64_rows = 0
    agree = 0
    with torch.no_grad():
        constants = model.margin_lipschitz_constants()
        for start in range(0, len(x), args.batch):
            xb, yb = x[start:start + args.batch], y[start:start + args.batch]
            logits = model.head(model.backbone(model.normalization(xb)))
            predictions, certified, _ = certify_logits(logits, constants, epsilon)
            exact_correct += int(((predictions == yb) & certified).sum())
            cert = model.certify(xb, epsilon)
            sound_correct += int(((cert.predictions == yb) & cert.certified).sum())
            float64_rows += int(cert.float64_rows.sum())
            agree += int((cert.predictions == predictions).sum())
    n = len(x)

    xb = x[: args.batch]
    forward_times, certify_times = [], []

    def forward():
        with torch.no_grad():
            model.head(model.backbone(model.normalization(xb)))

    for fn in (forward, lambda: model.certify(xb)):  # warm-up (caches, allocator)
        fn()
    for _ in range(args.repeats):
        for fn, times in ((forward, forward_times), (lambda: model.certify(xb), certify_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    forward_ms, certify_ms = statistics.median(forward_times) * 1e3, statistics.median(certify_times) * 1e3
    result = {
        "model": args.model, "backbone": config.backbone, "dataset": args.dataset, "examples": n,
        "epsilon": epsilon, "vra_exact_arithmetic": exact_correct / n, "vra_float_sound": sound_correct / n,
        "vra_lost_pp": 100 * (exact_correct - sound_correct) / n, "float64_fraction": float64_rows / n,
        "same_prediction_fraction": agree / n, "batch": args.batch, "threads": args.threads,
        "forward_ms": forward_ms, "certify_ms": certify_ms, "certify_over_forward": certify_ms / forward_ms,
    }
    print("| model | ε | VRA exact-arith. | VRA float-sound | lost (pp) | rows in float64 | forward ms | certify ms "
          "| certify/forward |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {config.backbone} | {epsilon:.4g} | {result['vra_exact_arithmetic']:.4f} | {result['vra_float_sound']:.4f} "
          f"| {result['vra_lost_pp']:.2f} | {100 * result['float64_fraction']:.2f}% | {forward_ms:.1f} | "
          f"{certify_ms:.1f} | {result['certify_over_forward']:.3f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
