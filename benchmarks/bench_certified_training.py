#!/usr/bin/env python
"""Certified training cost: GloRo vs CROWN-IBP (auto_LiRPA) vs plain cross-entropy, same data, same time budget.

    python benchmarks/bench_certified_training.py [--budget 300] [--threads 1] [--dataset_dir ../shared/data]
        [--quick]

Architecture: MNIST 2C2F (conv 16@4×4/2, conv 32@4×4/2, dense 100, dense 10). Data: the MNIST training split
(60,000 images, no augmentation); evaluation on the first ``--eval-images`` test images. L2 ε = 0.3 for every
method (CROWN-IBP is usually run with L∞ balls; here ``PerturbationLpNorm(norm=2)`` is used for parity).

Each method trains in its own child process for the same budget (``--budget`` seconds of training; evaluations
pause the clock). Seconds are CPU seconds of the training thread (``time.thread_time``, one torch thread): on an
idle machine they equal wall seconds, and other jobs on this shared 2-core machine do not shrink a method's
budget. Adam 1e-3, batch 256, learning rate constant for the first half of the budget
then decaying exponentially to 1e-6 (the MNIST recipe's schedule, by elapsed time instead of epochs):

* **GloRo** (hf-gloro ``GloRoForImageClassification`` with ``gloro_2c2f``, MinMax; the model's own training
  forward and loss: ``model(x, labels=y, epsilon=0.45).loss``, i.e. GloRo cross-entropy at 1.5·ε with 10
  power-iteration steps per step — what the recipe's Trainer calls, without the Trainer's bookkeeping).
  Certified by ``model.certify`` (float-sound).
* **CROWN-IBP** (auto_LiRPA 0.3, Zhang et al. 2020): the same layer sizes as plain ``nn.Conv2d``/``nn.Linear``
  with ReLU (``--crown-ibp-activation``; MinMax written with ReLUs triples IBP interval widths per layer).
  Loss ``κ·CE(logits) + (1−κ)·CE(−lb)``, where ``lb`` are lower bounds of ``y_c − y_i`` over the ball,
  ``lb = β·lb_CROWN-IBP + (1−β)·lb_IBP``; ε ramps linearly from 0 to 0.3 and κ, β from 1 to 0 over the first
  half of the budget (the paper's schedule, by elapsed time). Certified by its own bounds: a point counts when
  IBP *or* CROWN-IBP proves every margin positive (``certified``); the final model is also checked with full
  CROWN on ``--crown-eval-images`` images. Loss fusion is not used (see ``--help`` of the results section).
* **Plain** cross-entropy on the GloRo architecture (``head(backbone(normalization(x)))``); certified by the
  GloRo certificate of that network (its guaranteed global bound), which shows what certification without
  certified training gives.

Reported: mean and median seconds per training step, seconds per epoch (235 steps of 256, from the mean
step; CROWN-IBP's steps are dearer while β > 0, i.e. while CROWN-IBP bounds are computed), peak memory of
training (child's
peak RSS minus its RSS after data loading and model creation), steps done, and clean accuracy / VRA at every
evaluation (curve, ``benchmarks/results/certified_training.png``) and at the end of the budget.
Writes ``benchmarks/results/certified_training.{md,json,png}`` (``*_quick`` with ``--quick``: 6 s per method,
64 evaluation images, in one process; CI smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import _compare_common as common  # noqa: E402

METHODS = ("GloRo", "CROWN-IBP", "plain CE")
EPSILON = 0.3
BATCH = 256


class Schedule:
    """Learning rate and warm-up fractions as functions of the elapsed fraction ``t`` of the budget."""

    def __init__(self, budget: float, lr: float = 1e-3, final_lr: float = 1e-6):
        self.budget, self.lr, self.final_lr = budget, lr, final_lr

    def learning_rate(self, elapsed: float) -> float:
        t = min(1.0, elapsed / self.budget)
        if t <= 0.5:
            return self.lr
        return self.lr * (self.final_lr / self.lr) ** ((t - 0.5) / 0.5)

    def ramp(self, elapsed: float) -> float:
        """0 → 1 linearly over the first half of the budget."""
        return min(1.0, elapsed / (0.5 * self.budget))


# --- models ----------------------------------------------------------------------------------------------------
def gloro_model(seed: int):
    import hf_gloro

    torch.manual_seed(seed)
    config = hf_gloro.GloRoConfig(backbone="gloro_2c2f", num_channels=1, image_size=28, epsilon=EPSILON,
                                  power_iterations=10, num_labels=10)
    return hf_gloro.GloRoForImageClassification(config).train()


def crown_ibp_network(activation: str, seed: int) -> nn.Sequential:
    """2C2F with plain layers (PyTorch default initialisation)."""
    torch.manual_seed(seed)

    def act(channels: int, spatial: bool) -> nn.Module:
        return nn.ReLU() if activation == "relu" else common.PlainMinMax(channels, spatial)

    return nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), act(16, True), nn.Conv2d(16, 32, 4, 2, 1), act(32, True),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 100), act(100, False), nn.Linear(100, 10))


def margin_specification(labels: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """C matrix ``(B, m−1, m)`` with rows ``e_c − e_i`` (``i ≠ c``, ``c`` the label or predicted class)."""
    eye = torch.eye(classes)
    rows = eye[labels].unsqueeze(1) - eye.unsqueeze(0)
    keep = torch.ones(len(labels), classes, dtype=torch.bool)
    keep[torch.arange(len(labels)), labels] = False
    return rows[keep].view(len(labels), classes - 1, classes)


def lirpa_lower_margins(bounded, x: torch.Tensor, classes_for_spec: torch.Tensor, epsilon: float, method: str):
    from auto_LiRPA import BoundedTensor, PerturbationLpNorm

    perturbed = BoundedTensor(x, PerturbationLpNorm(norm=2, eps=epsilon))
    lower, _ = bounded.compute_bounds(x=(perturbed,), C=margin_specification(classes_for_spec), method=method,
                                      bound_upper=False)
    return lower


# --- evaluation ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_gloro_model(model, x, y) -> dict:
    was_training = model.training
    model.eval()
    predictions, certified = [], []
    for i in range(0, len(x), 500):
        cert = model.certify(x[i:i + 500], EPSILON)
        predictions.append(cert.predictions)
        certified.append(cert.certified)
    model.train(was_training)
    predictions, certified = torch.cat(predictions), torch.cat(certified)
    correct = predictions == y
    return {"clean_accuracy": float(correct.float().mean()), "vra": float((correct & certified).float().mean())}


def evaluate_crown_ibp(bounded, network, x, y, methods=("IBP", "CROWN-IBP"), batch: int = 250) -> dict:
    network.eval()
    with torch.no_grad():
        predictions = torch.cat([network(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    certified = {method: [] for method in methods}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            for method in methods:
                lower = lirpa_lower_margins(bounded, x[i:i + batch], predictions[i:i + batch], EPSILON, method)
                certified[method].append(lower.min(dim=1).values > 0)
    network.train()
    correct = predictions == y
    result = {"clean_accuracy": float(correct.float().mean())}
    union = torch.zeros(len(x), dtype=torch.bool)
    for method, chunks in certified.items():
        mask = torch.cat(chunks)
        union |= mask
        result[f"vra_{method}"] = float((correct & mask).float().mean())
    result["vra"] = float((correct & union).float().mean())
    return result


# --- one method ------------------------------------------------------------------------------------------------
def train_one(method: str, args, x_train, y_train, x_test, y_test) -> dict:
    """Train ``method`` for ``args.budget`` seconds of training time; evaluate every ``args.eval_every``."""
    torch.manual_seed(args.seed)
    schedule = Schedule(args.budget)
    generator = torch.Generator().manual_seed(args.seed)
    bounded = network = model = None
    if method == "CROWN-IBP":
        common.import_auto_lirpa()
        from auto_LiRPA import BoundedModule

        network = crown_ibp_network(args.crown_ibp_activation, args.seed).train()
        bounded = BoundedModule(network, torch.zeros(1, 1, 28, 28), device="cpu",
                                bound_opts={"sparse_features_alpha": False})
        parameters = list(network.parameters())
    else:
        model = gloro_model(args.seed)
        parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=schedule.lr)

    def evaluate() -> dict:
        if method == "CROWN-IBP":
            return evaluate_crown_ibp(bounded, network, x_test, y_test)
        return evaluate_gloro_model(model, x_test, y_test)

    def step(xb, yb, elapsed):
        for group in optimizer.param_groups:
            group["lr"] = schedule.learning_rate(elapsed)
        if method == "GloRo":
            loss = model(xb, labels=yb, epsilon=EPSILON * args.gloro_train_multiplier).loss
        elif method == "plain CE":
            loss = F.cross_entropy(model.head(model.backbone(model.normalization(xb))), yb)
        else:
            ramp = schedule.ramp(elapsed)
            kappa, beta, epsilon = 1.0 - ramp, 1.0 - ramp, EPSILON * ramp
            logits = bounded(xb)
            loss = kappa * F.cross_entropy(logits, yb)
            if epsilon > 0:
                lower = lirpa_lower_margins(bounded, xb, yb, epsilon, "IBP")
                if beta > 0:
                    crown = lirpa_lower_margins(bounded, xb, yb, epsilon, "CROWN-IBP")
                    lower = beta * crown + (1 - beta) * lower
                # CE over [0, −lb_i]: the worst-case logits relative to the label (CROWN-IBP's robust loss).
                worst = torch.cat([torch.zeros(len(yb), 1), -lower], dim=1)
                loss = loss + (1 - kappa) * F.cross_entropy(worst, torch.zeros(len(yb), dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    base_rss = common.rss_bytes()
    elapsed, steps, step_times, curve, phases = 0.0, 0, [], [], {}
    next_eval = 0.0
    order, position = torch.randperm(len(x_train), generator=generator), 0
    with common.PeakRSS() as peak:
        while True:
            if elapsed >= next_eval or elapsed >= args.budget:
                point = evaluate()
                curve.append({"train_seconds": elapsed, "steps": steps} | point)
                print(f"    {method}: {elapsed:6.1f} s, {steps} steps, clean {point['clean_accuracy']:.3f}, "
                      f"VRA {point['vra']:.3f}", flush=True)
                next_eval += args.eval_every
                if elapsed >= args.budget:
                    break
            if position + BATCH > len(x_train):
                order, position = torch.randperm(len(x_train), generator=generator), 0
            index = order[position:position + BATCH]
            position += BATCH
            phase = "CROWN-IBP bounds" if method == "CROWN-IBP" and 0 < schedule.ramp(elapsed) < 1 else "main"
            start = time.thread_time()
            loss = step(x_train[index], y_train[index], elapsed)
            seconds = time.thread_time() - start
            if not math.isfinite(loss):
                curve.append({"train_seconds": elapsed, "steps": steps, "error": "loss is not finite"})
                break
            elapsed += seconds
            step_times.append(seconds)
            phases.setdefault(phase, []).append(seconds)
            steps += 1
    final = curve[-1]
    if method == "CROWN-IBP" and args.crown_eval_images > 0:
        from auto_LiRPA import BoundedModule

        fresh = BoundedModule(network, torch.zeros(1, 1, 28, 28), device="cpu",
                              bound_opts={"sparse_features_alpha": False})
        n = args.crown_eval_images
        crown = evaluate_crown_ibp(fresh, network, x_test[:n], y_test[:n], methods=("IBP", "CROWN-IBP", "CROWN"),
                                   batch=50)
        final = final | {"full_crown_check": crown | {"images": n}}
    median_step = statistics.median(step_times) if step_times else float("nan")
    return {"method": method, "steps": steps, "train_seconds": elapsed, "median_step_s": median_step,
            "mean_step_s": elapsed / max(steps, 1),
            "median_step_s_by_phase": {name: statistics.median(times) for name, times in phases.items()},
            "seconds_per_epoch": elapsed / max(steps, 1) * math.ceil(60_000 / BATCH),
            "epochs_done": steps * BATCH / 60_000,
            "peak_memory_mb": (peak.peak - base_rss) / 2**20, "final": final, "curve": curve}


def child_main(spec: dict) -> dict:
    args = argparse.Namespace(**spec)
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_data(args)
    return train_one(args.method, args, x_train, y_train, x_test, y_test)


def load_data(args):
    x_train, y_train = common.load_tensors("ylecun/mnist", "train", args.dataset_dir, 1, 28, args.train_images)
    x_test, y_test = common.load_tensors("ylecun/mnist", "test", args.dataset_dir, 1, 28, args.eval_images)
    return x_train, y_train, x_test, y_test


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for run in results["runs"]:
        points = [p for p in run["curve"] if "vra" in p]
        axis.plot([p["train_seconds"] for p in points], [p["vra"] for p in points], marker="o",
                  label=f"{run['method']} (VRA)")
    axis.set_xlabel("training time (CPU s of the training thread, evaluation excluded)")
    axis.set_ylabel(f"VRA at L2 ε = {EPSILON} (own certificate)")
    axis.set_title(f"MNIST 2C2F, {results['machine']['torch_threads']} thread(s)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(results: dict) -> str:
    lines = ["# Certified training: GloRo vs CROWN-IBP vs plain cross-entropy (MNIST 2C2F, L2 ε = 0.3)", "",
             common.machine_line(results["machine"]) + f" (load after: {results['load_after']})", "",
             f"Command: `{results['command']}`", "",
             f"Budget: {results['budget']:g} s of training per method; evaluation on the first "
             f"{results['eval_images']} test images.", "",
             "| method | step (ms, mean) | step (ms, median by phase) | s / epoch | peak memory (MB) | steps | epochs "
             "| clean | VRA (own certificate) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        if "error" in run:
            lines.append(f"| {run['method']} | {run['error']} | | | | | | | |")
            continue
        final = run["final"]
        vra = f"{final['vra']:.4f}"
        if "vra_IBP" in final:
            vra += f" (IBP {final['vra_IBP']:.4f}, CROWN-IBP {final['vra_CROWN-IBP']:.4f})"
        by_phase = ", ".join(f"{name} {value * 1e3:.1f}" for name, value in run["median_step_s_by_phase"].items())
        lines.append(f"| {run['method']} | {run['mean_step_s'] * 1e3:.1f} | {by_phase} | "
                     f"{run['seconds_per_epoch']:.1f} | "
                     f"{run['peak_memory_mb']:.0f} | {run['steps']} | {run['epochs_done']:.2f} | "
                     f"{final['clean_accuracy']:.4f} | {vra} |")
    ratios = results.get("ratios", {})
    if ratios:
        lines += ["", "Ratios to GloRo: " + ", ".join(f"{k} {v:.3g}" for k, v in ratios.items()) + "."]
    for run in results["runs"]:
        check = run.get("final", {}).get("full_crown_check")
        if check:
            lines += ["", f"{run['method']} final model on {check['images']} test images: clean "
                      f"{check['clean_accuracy']:.4f}; VRA by IBP {check['vra_IBP']:.4f}, by CROWN-IBP "
                      f"{check['vra_CROWN-IBP']:.4f}, by full CROWN {check['vra_CROWN']:.4f}, any {check['vra']:.4f}."]
    if results.get("plot"):
        lines += ["", f"![VRA vs wall-clock]({Path(results['plot']).name})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per method")
    parser.add_argument("--eval-every", type=float, default=None, help="seconds (default budget/6)")
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--train-images", type=int, default=60_000)
    parser.add_argument("--crown-eval-images", type=int, default=100)
    parser.add_argument("--crown-ibp-activation", choices=("relu", "minmax"), default="relu")
    parser.add_argument("--gloro-train-multiplier", type=float, default=1.5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dataset_dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))))
        return
    if args.quick:
        args.budget, args.eval_images, args.train_images, args.crown_eval_images = 6.0, 64, 2048, 8
    if args.eval_every is None:
        args.eval_every = args.budget / 6
    info = common.machine_info(args.threads)
    print(common.machine_line(info), flush=True)
    started = time.perf_counter()
    runs = []
    if args.quick:
        data = load_data(args)
    for method in args.methods:
        print(f"  {method}: training for {args.budget:g} s", flush=True)
        if args.quick:
            runs.append(train_one(method, args, *data))
            continue
        spec = vars(args) | {"method": method, "child": None}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        sys.stdout.write("".join(line + "\n" for line in done.stdout.splitlines()[:-1]))
        if done.returncode != 0:
            runs.append({"method": method, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]})
            continue
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ok = {run["method"]: run for run in runs if "error" not in run}
    ratios = {}
    if "GloRo" in ok:
        for method, run in ok.items():
            if method != "GloRo":
                ratios[f"{method} mean step time"] = run["mean_step_s"] / ok["GloRo"]["mean_step_s"]
                ratios[f"{method} peak memory"] = run["peak_memory_mb"] / max(ok["GloRo"]["peak_memory_mb"], 1e-9)
    stem = "certified_training_quick" if args.quick else "certified_training"
    out = Path(args.out_dir) if args.out_dir else common.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": info, "load_after": [round(v, 2) for v in os.getloadavg()], "budget": args.budget,
               "eval_images": args.eval_images, "epsilon": EPSILON, "batch": BATCH, "quick": args.quick,
               "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
               "crown_ibp_activation": args.crown_ibp_activation, "ratios": ratios, "runs": runs,
               "wall_seconds": time.perf_counter() - started}
    try:
        plot(results, out / f"{stem}.png")
        results["plot"] = str(out / f"{stem}.png")
    except ImportError:
        results["plot"] = None
    text = markdown(results)
    print("\n" + text)
    md_path, json_path = common.write_results(stem, text, results, out)
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
