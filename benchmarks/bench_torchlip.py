#!/usr/bin/env python
"""hf-gloro vs a 1-Lipschitz library (deel-torchlip) on MNIST at L2 ε = 0.3, same CPU budget.

    python benchmarks/bench_torchlip.py [--budget 600] [--gloro-model /work/models/mnist_2c2f]
        [--dataset_dir ../shared/data] [--threads 1] [--quick]

* **deel-torchlip** with the layers and loss of its multiclass tutorial ("HKR multiclass and fooling"):
  ``SpectralConv2d(1→16, 3×3, same)``, ``GroupSort2``, ``ScaledL2NormPool2d(2)``, ``SpectralConv2d(16→32)``,
  ``GroupSort2``, ``ScaledL2NormPool2d(2)``, ``Flatten``, ``SpectralLinear(1568→64)``, ``GroupSort2``,
  ``SpectralLinear(64→10, no bias)``; ``HKRMulticlassLoss(alpha, min_margin)``. The tutorial's
  ``alpha=100`` is deprecated and mapped by the library to 100/101; here ``--alpha 0.99``. Its
  ``min_margin=0.25`` targets Fashion-MNIST; a certificate at ε needs a margin of at least ``√2·ε = 0.42``,
  so the default is ``--min-margin 0.64`` (1.5·√2·ε, the same 1.5× over-shoot as the GloRo recipe's training ε).
  Adam 1e-3, batch 256, learning rate constant for half the budget then decaying exponentially to 1e-6 (the
  GloRo recipe's schedule, by elapsed time), no augmentation, trained for ``--budget`` seconds (evaluation
  pauses the clock; CPU seconds of the training thread, one torch thread, so the shared machine's other jobs
  do not shrink the budget; the recipe's recorded time is wall time on the same machine).
* **Certificates for the torchlip model**:
  - *documented*: ``(top1 − top2)/√2`` (the tutorial's formula: if the network is 1-Lipschitz, each logit
    difference ``y_i − y_j`` is ``‖e_i − e_j‖ = √2``-Lipschitz). It trusts the layers' power-iteration /
    Björck normalisation to make every layer exactly 1-Lipschitz.
  - *guaranteed*: ``min_i (y_j − y_i) / (L_body · ‖w_j − w_i‖)`` with ``L_body`` the product of hf-gloro's
    guaranteed per-layer bounds of the exported (vanilla) layers (``conv2d_spectral_norm_bound`` /
    ``dense_spectral_norm_bound``; GroupSort2 and the non-overlapping L2-norm pooling are 1-Lipschitz),
    ``w`` the rows of the last layer. Exact-arithmetic, not float-sound (no rounding terms), unlike
    ``model.certify``.
* **hf-gloro**: by default the saved MNIST recipe model (``--gloro-model``; its training time and test
  figures are read from its ``all_results.json``, i.e. the recipe's measured numbers, not re-run here), whose
  ``model.certify`` is timed in this run. ``--train-gloro`` trains hf-gloro's 2C2F here for the same budget
  instead (same loop as ``bench_certified_training.py``).
* **img/s**: certification throughput on the test images at batch 256 (torchlip: vanilla-exported network +
  its margin certificate; hf-gloro: ``model.certify``), and training throughput (images per second of
  training steps).

Writes ``benchmarks/results/torchlip.{md,json}`` (``torchlip_quick.*`` with ``--quick``: 5 s of training, 64
test images; CI smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _compare_common as common  # noqa: E402

EPSILON = 0.3
BATCH = 256


def torchlip_model(seed: int):
    from deel import torchlip

    torch.manual_seed(seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sequential model contains a layer which is not a Lipschitz layer: Flatten"
        return torchlip.Sequential(
            torchlip.SpectralConv2d(1, 16, (3, 3), padding="same"), torchlip.GroupSort2(),
            torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
            torchlip.SpectralConv2d(16, 32, (3, 3), padding="same"), torchlip.GroupSort2(),
            torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
            nn.Flatten(), torchlip.SpectralLinear(1568, 64), torchlip.GroupSort2(),
            torchlip.SpectralLinear(64, 10, bias=False), k_coef_lip=1.0)


def guaranteed_body_bound(vanilla: nn.Sequential, image_size: int = 28) -> tuple[float, torch.Tensor]:
    """``(L_body, W_last)``: product of guaranteed layer bounds before the last linear layer, and its weight."""
    from hf_gloro.lipschitz.spectral_bounds import conv2d_spectral_norm_bound, dense_spectral_norm_bound

    bound, size = 1.0, (image_size, image_size)
    layers = list(vanilla)
    last = layers[-1]
    if not isinstance(last, nn.Linear):
        raise TypeError("the last layer of the torchlip model must be linear")
    for layer in layers[:-1]:
        name = type(layer).__name__
        if isinstance(layer, nn.Conv2d):
            if layer.padding == "same":
                padding = tuple((k - 1) // 2 for k in layer.kernel_size)
                if any(k % 2 == 0 for k in layer.kernel_size) or layer.stride != (1, 1):
                    raise TypeError("'same' padding with an even kernel or a stride is not handled")
            else:
                padding = layer.padding
            if getattr(layer, "padding_mode", "zeros") != "zeros":
                raise TypeError(f"padding mode {layer.padding_mode} is not handled")
            bound *= conv2d_spectral_norm_bound(layer.weight.detach(), size, layer.stride, padding, layer.dilation,
                                                layer.groups)
            size = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                         zip(size, padding, layer.dilation, layer.kernel_size, layer.stride))
        elif isinstance(layer, nn.Linear):
            bound *= dense_spectral_norm_bound(layer.weight.detach())
        elif name in ("GroupSort2", "GroupSort", "MaxMin", "FullSort", "Flatten"):
            pass  # permutations of coordinates / reshapes: 1-Lipschitz
        elif name in ("ScaledL2NormPool2d", "LPPool2d"):
            kernel = layer.kernel_size if isinstance(layer.kernel_size, tuple) else (layer.kernel_size,) * 2
            stride = layer.stride if layer.stride is not None else kernel
            stride = stride if isinstance(stride, tuple) else (stride,) * 2
            if tuple(stride) != tuple(kernel) or getattr(layer, "norm_type", 2) != 2:
                raise TypeError("only non-overlapping L2-norm pooling is handled")
            # ‖(‖x_w‖)_w‖ ≤ ‖x‖ for disjoint windows
            bound *= float(getattr(layer, "_coefficient_lip", 1.0))
            size = tuple(n // k for n, k in zip(size, kernel))
        else:
            raise TypeError(f"no guaranteed bound for {name}")
    return bound, last.weight.detach()


@torch.no_grad()
def torchlip_certify(vanilla: nn.Sequential, x: torch.Tensor, body_bound: float, last_weight: torch.Tensor,
                     batch: int = BATCH) -> dict:
    """Predictions and both certified radii (documented ``(top1 − top2)/√2`` and guaranteed pairwise)."""
    w = last_weight.double()
    distances = torch.cdist(w, w)  # ‖w_j − w_i‖
    predictions, documented, guaranteed = [], [], []
    start = time.thread_time()
    for i in range(0, len(x), batch):
        logits = vanilla(x[i:i + batch])
        top = logits.topk(2, dim=1).values
        documented.append((top[:, 0] - top[:, 1]) / math.sqrt(2))
        predicted = logits.argmax(1)
        margins = logits.gather(1, predicted[:, None]).double() - logits.double()
        radii = margins / (body_bound * distances[predicted])
        radii[torch.arange(len(predicted)), predicted] = float("inf")  # no constraint against itself
        guaranteed.append(radii.min(dim=1).values)
        predictions.append(predicted)
    seconds = time.thread_time() - start
    return {"predictions": torch.cat(predictions), "documented_radius": torch.cat(documented),
            "guaranteed_radius": torch.cat(guaranteed), "images_per_s": len(x) / seconds}  # per CPU second


def evaluate_torchlip(model, x, y) -> dict:
    model.eval()
    vanilla = model.vanilla_export()
    vanilla.eval()
    body, last = guaranteed_body_bound(vanilla)
    cert = torchlip_certify(vanilla, x, body, last)
    model.train()
    correct = cert["predictions"] == y
    return {"clean_accuracy": float(correct.float().mean()),
            "vra": float((correct & (cert["documented_radius"] > EPSILON)).float().mean()),
            "vra_guaranteed": float((correct & (cert["guaranteed_radius"] > EPSILON)).float().mean()),
            "body_bound": body, "certify_images_per_s": cert["images_per_s"]}


def train_torchlip(args, x_train, y_train, x_test, y_test) -> dict:
    from deel import torchlip

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_certified_training import Schedule

    model = torchlip_model(args.seed).train()
    loss_fn = torchlip.HKRMulticlassLoss(alpha=args.alpha, min_margin=args.min_margin)
    schedule = Schedule(args.budget)
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr)
    generator = torch.Generator().manual_seed(args.seed)
    order, position = torch.randperm(len(x_train), generator=generator), 0
    elapsed, steps, step_times, curve, next_eval = 0.0, 0, [], [], 0.0
    base = common.rss_bytes()
    with common.PeakRSS() as peak:
        while True:
            if elapsed >= next_eval or elapsed >= args.budget:
                point = evaluate_torchlip(model, x_test[:args.eval_images], y_test[:args.eval_images])
                curve.append({"train_seconds": elapsed, "steps": steps} | point)
                print(f"    torchlip: {elapsed:6.1f} s, {steps} steps, clean {point['clean_accuracy']:.3f}, VRA "
                      f"{point['vra']:.3f} (guaranteed {point['vra_guaranteed']:.3f}, "
                      f"L_body {point['body_bound']:.4f})",
                      flush=True)
                next_eval += args.eval_every
                if elapsed >= args.budget:
                    break
            if position + BATCH > len(x_train):
                order, position = torch.randperm(len(x_train), generator=generator), 0
            index = order[position:position + BATCH]
            position += BATCH
            start = time.thread_time()
            for group in optimizer.param_groups:
                group["lr"] = schedule.learning_rate(elapsed)
            loss = loss_fn(model(x_train[index]), torch.nn.functional.one_hot(y_train[index], 10))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds = time.thread_time() - start
            elapsed += seconds
            step_times.append(seconds)
            steps += 1
    final = evaluate_torchlip(model, x_test, y_test)
    return {"steps": steps, "train_seconds": elapsed, "epochs_done": steps * BATCH / len(x_train),
            "train_images_per_s": BATCH / statistics.median(step_times), "peak_memory_mb": (peak.peak - base) / 2**20,
            "final": final, "curve": curve}


def gloro_reference(args, x_test, y_test) -> dict:
    """The saved recipe model: its recorded training figures, and certify() timed and evaluated here."""
    import warnings

    import hf_gloro

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_gloro.GloRoForImageClassification.from_pretrained(args.gloro_model).eval()
    model.certify(x_test[:2])  # bound computed and cached
    predictions, certified = [], []
    start = time.thread_time()
    with torch.no_grad():
        for i in range(0, len(x_test), BATCH):
            cert = model.certify(x_test[i:i + BATCH])
            predictions.append(cert.predictions)
            certified.append(cert.certified)
    seconds = time.thread_time() - start
    predictions, certified = torch.cat(predictions), torch.cat(certified)
    correct = predictions == y_test
    recorded_path = Path(args.gloro_model) / "all_results.json"
    recorded = json.loads(recorded_path.read_text()) if recorded_path.exists() else {}
    return {"model": args.gloro_model, "clean_accuracy": float(correct.float().mean()),
            "vra": float((correct & certified).float().mean()), "certify_images_per_s": len(x_test) / seconds,
            "recorded_train_seconds": recorded.get("train_runtime"), "recorded_epochs": recorded.get("epoch"),
            "recorded_train_images_per_s": recorded.get("train_samples_per_second"),
            "recorded_test_vra": recorded.get("test_vra"),
            "recorded_test_clean_accuracy": recorded.get("test_clean_accuracy")}


def gloro_training_throughput(x_train, y_train, steps: int = 20) -> float:
    """Training images/s of hf-gloro's 2C2F GloRo step (forward with 10 power iterations + loss + Adam), median."""
    from bench_certified_training import gloro_model

    model = gloro_model(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for step in range(steps + 3):
        index = torch.arange(step * BATCH, (step + 1) * BATCH) % len(x_train)
        start = time.thread_time()
        loss = model(x_train[index], labels=y_train[index], epsilon=0.45).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 3:
            times.append(time.thread_time() - start)
    return BATCH / statistics.median(times)


def markdown(results: dict) -> str:
    t, g = results["torchlip"], results["gloro"]
    tf = t["final"]
    lines = [f"# hf-gloro vs deel-torchlip {results['torchlip_version']} (MNIST, L2 ε = {EPSILON})", "",
             common.machine_line(results["machine"]) + f" (load after: {results['load_after']})", "",
             f"Command: `{results['command']}`", "",
             "| | training budget | epochs | train img/s | certify img/s | clean | VRA | VRA, guaranteed bound |",
             "|---|---|---|---|---|---|---|---|",
             f"| deel-torchlip (HKR α={results['alpha']}, margin {results['min_margin']:.3g}) | "
             f"{t['train_seconds']:.0f} s (this run) | {t['epochs_done']:.2f} | {t['train_images_per_s']:.0f} | "
             f"{tf['certify_images_per_s']:.0f} | {tf['clean_accuracy']:.4f} | {tf['vra']:.4f} (top-2 margin/√2) | "
             f"{tf['vra_guaranteed']:.4f} (L_body = {tf['body_bound']:.4f}) |"]
    if "trained" in g:
        gf = g["trained"]["final"]
        lines.append(f"| hf-gloro 2C2F (GloRo CE, trained here) | {g['trained']['train_seconds']:.0f} s (this run) | "
                     f"{g['trained']['epochs_done']:.2f} | {g['train_images_per_s']:.0f} | "
                     f"{g['certify_images_per_s']:.0f} | "
                     f"{gf['clean_accuracy']:.4f} | {gf['vra']:.4f} (float-sound) | same |")
    else:
        lines.append(f"| hf-gloro 2C2F (`{Path(g['model']).name}`, MNIST recipe) | "
                     f"{common.fmt(g['recorded_train_seconds'])} s (recorded) | {common.fmt(g['recorded_epochs'])} | "
                     f"{g['train_images_per_s']:.0f} (step, this run) | {g['certify_images_per_s']:.0f} | "
                     f"{g['clean_accuracy']:.4f} | {g['vra']:.4f} (float-sound) | same |")
    lines += ["", f"Evaluated on {results['test_images']} test images. torchlip's documented certificate assumes every "
              "layer is exactly 1-Lipschitz; the guaranteed column recomputes the certificate from guaranteed "
              "per-layer bounds of the exported weights."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600.0,
                        help="training seconds for torchlip (default: the ~10-minute CPU budget of the saved "
                        "recipe model)")
    parser.add_argument("--eval-every", type=float, default=None)
    parser.add_argument("--eval-images", type=int, default=1000, help="test images for the curve")
    parser.add_argument("--test-images", type=int, default=10_000, help="test images for the final figures")
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--min-margin", type=float, default=1.5 * math.sqrt(2) * EPSILON)
    parser.add_argument("--gloro-model", default="/work/models/mnist_2c2f")
    parser.add_argument("--train-gloro", action="store_true", help="train hf-gloro here for the same budget")
    parser.add_argument("--dataset_dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.budget, args.eval_images, args.test_images = 5.0, 64, 64
    if args.eval_every is None:
        args.eval_every = args.budget / 5
    import deel.torchlip

    info = common.machine_info(args.threads)
    print(common.machine_line(info), flush=True)
    started = time.perf_counter()
    train_images = 2048 if args.quick else 60_000
    x_train, y_train = common.load_tensors("ylecun/mnist", "train", args.dataset_dir, 1, 28, train_images)
    x_test, y_test = common.load_tensors("ylecun/mnist", "test", args.dataset_dir, 1, 28, args.test_images)
    print(f"  deel-torchlip: training for {args.budget:g} s", flush=True)
    torchlip_run = train_torchlip(args, x_train, y_train, x_test, y_test)
    print("  hf-gloro", flush=True)
    gloro = gloro_reference(args, x_test, y_test)
    gloro["train_images_per_s"] = gloro_training_throughput(x_train, y_train, steps=3 if args.quick else 20)
    if args.train_gloro:
        from bench_certified_training import train_one

        spec = argparse.Namespace(budget=args.budget, eval_every=args.eval_every, seed=args.seed,
                                  gloro_train_multiplier=1.5, crown_eval_images=0, crown_ibp_activation="relu")
        trained = train_one("GloRo", spec, x_train, y_train, x_test, y_test)
        gloro["trained"] = trained
    results = {"machine": info, "load_after": [round(v, 2) for v in os.getloadavg()],
               "torchlip_version": getattr(deel.torchlip, "__version__", "?"), "epsilon": EPSILON,
               "alpha": args.alpha, "min_margin": args.min_margin, "budget": args.budget,
               "test_images": len(x_test), "quick": args.quick,
               "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
               "torchlip": torchlip_run, "gloro": gloro, "wall_seconds": time.perf_counter() - started}
    text = markdown(results)
    print("\n" + text)
    md_path, json_path = common.write_results("torchlip_quick" if args.quick else "torchlip", text, results,
                                              args.out_dir)
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
