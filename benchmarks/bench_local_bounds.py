#!/usr/bin/env python
"""GloRo's certificate vs local bound propagation (auto_LiRPA IBP, CROWN, α-CROWN) on the same models:
cost (images/s, memory) and strength (fraction certified at the model's ε).

    python benchmarks/bench_local_bounds.py [--mnist-model /work/models/mnist_2c2f]
        [--cifar-model /work/models/cifar_liresnet] [--dataset_dir ../shared/data] [--threads 1] [--quick]

Threat model for every method: the L2 ball of radius ε (the model's ``config.epsilon``) around a test image,
pixels in [0, 1]; no box constraint is used by any method.

* **GloRo** (``model.certify``): the float-sound global-Lipschitz certificate, one forward pass per batch.
  Timed after the guaranteed bound is cached (the bound's one-off cost is reported separately).
* **images/s** are images per CPU second of the measuring thread (``_compare_common.Clock``; one torch
  thread), so that other jobs on the shared machine do not distort the ratios; wall seconds are in the JSON.
* **auto_LiRPA 0.3** on the exported plain network (``_compare_common.export_plain``: ``nn.Conv2d`` /
  ``nn.Linear`` + MinMax as ``max(a,b) = b + relu(a−b)``, ``min(a,b) = a − relu(a−b)``; its logits are checked
  against the hf-gloro model's before anything is measured), ``PerturbationLpNorm(norm=2, eps=ε)``. The
  specification is auto_LiRPA's C matrix with rows ``e_j − e_i`` (``i ≠ j``, ``j`` the predicted class): a point
  is certified iff every lower bound of ``y_j − y_i`` is ``> 0``. Methods: ``IBP``, ``CROWN`` (full backward
  bounds for every intermediate layer) and ``alpha-CROWN`` (``--alpha-iterations`` Adam steps on the ReLU
  lower slopes, intermediate bounds fixed at CROWN's: auto_LiRPA's default). auto_LiRPA is not float-sound
  (its bounds are computed in float32 without rounding terms); GloRo's are. That favours auto_LiRPA.
* Each auto_LiRPA run happens in a child process whose address space is capped (``--memory-cap-gib``, default
  8); the reported memory is the child's peak RSS minus its RSS before bounding. A run that hits the cap is
  reported as such, not silently dropped.
* **"A local bound does not help"**: on the points where both were run, the fraction certified by the local
  method, by GloRo, by both, and by the local method only (the union's gain over GloRo).
* **Contrast**: the same architecture trained with plain cross-entropy for ``--ce-epochs`` epochs (trained by
  this script and cached under ``~/.cache/hf-gloro-bench``).

Writes ``benchmarks/results/local_bounds.{md,json}`` (``local_bounds_quick.*`` with ``--quick``). ``--quick``: the
MNIST model, a few images, 3 α steps, a 40-step CE model, no child processes (CI smoke test, < 1 minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _compare_common as common  # noqa: E402

METHODS = ("IBP", "CROWN", "alpha-CROWN")
DATASETS = {"gloro_2c2f": "ylecun/mnist", "gloro_4c3f": "ylecun/mnist"}
CACHE = Path(os.environ.get("HF_GLORO_BENCH_CACHE", Path.home() / ".cache" / "hf-gloro-bench"))


def dataset_for(model) -> str:
    return DATASETS.get(model.config.backbone, "ylecun/mnist" if model.config.num_channels == 1 else "uoft-cs/cifar10")


def load_model(path: str):
    import warnings

    import hf_gloro

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_gloro.GloRoForImageClassification.from_pretrained(path).eval()


# --- GloRo ---------------------------------------------------------------------------------------------------
def gloro_certify(model, x: torch.Tensor, batch: int) -> dict:
    """``model.certify`` over ``x`` in batches; images per CPU second after the bound is cached, and a plain
    forward's."""
    with common.Clock() as bound:
        model.certify(x[:2])  # computes and caches the guaranteed bound
    predictions, certified, radius = [], [], []
    with torch.no_grad():
        with common.Clock() as clock:
            for i in range(0, len(x), batch):
                cert = model.certify(x[i:i + batch])
                predictions.append(cert.predictions)
                certified.append(cert.certified)
                radius.append(cert.radius)
        with common.Clock() as forward:
            for i in range(0, len(x), batch):
                model.head(model.backbone(model.normalization(x[i:i + batch])))
    return {"predictions": torch.cat(predictions), "certified": torch.cat(certified), "radius": torch.cat(radius),
            "cpu_seconds": clock.cpu, "wall_seconds": clock.wall, "images_per_s": len(x) / clock.cpu,
            "forward_images_per_s": len(x) / forward.cpu, "bound_seconds": bound.cpu}


# --- auto_LiRPA ------------------------------------------------------------------------------------------------
def specification(predictions: torch.Tensor, classes: int) -> torch.Tensor:
    """auto_LiRPA's C matrix ``(B, m−1, m)``: rows ``e_j − e_i`` for every ``i ≠ j`` (``j`` predicted)."""
    eye = torch.eye(classes)
    rows = eye[predictions].unsqueeze(1) - eye.unsqueeze(0)  # (B, m, m); row i = e_j − e_i
    keep = torch.ones(len(predictions), classes, dtype=torch.bool)
    keep[torch.arange(len(predictions)), predictions] = False
    return rows[keep].view(len(predictions), classes - 1, classes)


def lirpa_certify(exported, x: torch.Tensor, epsilon: float, method: str, batch: int, alpha_iterations: int) -> dict:
    """Lower bounds of ``y_j − y_i`` over the L2 ball for every image; certified iff all are > 0."""
    common.import_auto_lirpa()
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    centred = exported.center(x)
    with torch.no_grad():
        logits = exported.net(centred)
    predictions = logits.argmax(1)
    classes = logits.shape[1]
    options = {"sparse_features_alpha": False,  # its sparse-α scatter fails on torch 2.14 (shape mismatch)
               "optimize_bound_args": {"iteration": alpha_iterations}}
    # A fresh BoundedModule per method: reusing one across methods trips internal assertions in 0.3.
    bounded = BoundedModule(exported.net, torch.zeros_like(centred[:1]), device="cpu", bound_opts=options)
    margins = []
    clock = common.Clock().__enter__()
    for i in range(0, len(x), batch):
        chunk = centred[i:i + batch]
        perturbed = BoundedTensor(chunk, PerturbationLpNorm(norm=2, eps=epsilon))
        grad = torch.enable_grad() if method == "alpha-CROWN" else torch.no_grad()
        with grad:
            lower, _ = bounded.compute_bounds(x=(perturbed,), C=specification(predictions[i:i + batch], classes),
                                              method=method, bound_upper=False)
        margins.append(lower.detach().min(dim=1).values)
    clock.__exit__(None, None, None)
    margin = torch.cat(margins)
    return {"predictions": predictions, "certified": margin > 0, "lower_margin": margin, "cpu_seconds": clock.cpu,
            "wall_seconds": clock.wall, "images_per_s": len(x) / clock.cpu}


def child_main(spec: dict) -> dict:
    """One auto_LiRPA measurement in this (child) process, under the address-space cap."""
    torch.set_num_threads(spec["threads"])
    common.limit_address_space(spec["memory_cap_gib"])
    model = load_model(spec["model"])
    x, _ = common.load_tensors(spec["dataset"], "test", spec["dataset_dir"], model.config.num_channels,
                               model.config.image_size, spec["limit"])
    exported = common.export_plain(model)
    common.check_export(model, exported, x[:64])
    common.import_auto_lirpa()
    base = common.rss_bytes()
    try:
        result = lirpa_certify(exported, x, spec["epsilon"], spec["method"], spec["batch"], spec["alpha_iterations"])
    except (MemoryError, RuntimeError) as error:  # RLIMIT_AS: allocation failures surface as either
        message = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        if isinstance(error, RuntimeError) and "alloc" not in message.lower() and "memory" not in message.lower():
            raise
        return {"error": f"exceeds the {spec['memory_cap_gib']:g} GiB memory cap ({message})"}
    return {"predictions": result["predictions"].tolist(), "certified": result["certified"].tolist(),
            "lower_margin": result["lower_margin"].tolist(), "cpu_seconds": result["cpu_seconds"],
            "wall_seconds": result["wall_seconds"],
            "images_per_s": result["images_per_s"],
            "peak_memory_mb": (common.peak_rss_bytes() - base) / 2**20}


def run_method(spec: dict, isolate: bool, exported=None, x=None) -> dict:
    if not isolate:
        base = common.rss_bytes()
        with common.PeakRSS() as peak:
            result = lirpa_certify(exported, x[:spec["limit"]], spec["epsilon"], spec["method"], spec["batch"],
                                   spec["alpha_iterations"])
        return {key: (value.tolist() if torch.is_tensor(value) else value) for key, value in result.items()} | {
            "peak_memory_mb": (peak.peak - base) / 2**20}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=spec["timeout_s"])
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {spec['timeout_s']} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        killed = done.returncode < 0 or "MemoryError" in done.stderr or "alloc" in done.stderr.lower()
        reason = f"exceeds the {spec['memory_cap_gib']:g} GiB memory cap" if killed else "failed"
        return {"error": f"{reason}: {tail[0][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the cross-entropy contrast model --------------------------------------------------------------------------
def train_cross_entropy(reference_path: str, dataset_dir: str, epochs: float, seed: int = 0) -> str:
    """The reference model's architecture trained with plain cross-entropy (Adam 1e-3, batch 128; ``epochs`` of
    60,000 MNIST-sized training sets), cached."""
    import hf_gloro

    steps_tag = f"{epochs:g}"
    folder = CACHE / f"{Path(reference_path).name}_ce_{steps_tag}ep_s{seed}"
    if (folder / "config.json").exists():
        return str(folder)
    reference = load_model(reference_path)
    config = hf_gloro.GloRoConfig.from_dict(reference.config.to_dict())
    config.lipschitz_constant = None
    torch.manual_seed(seed)
    model = hf_gloro.GloRoForImageClassification(config).train()
    steps = max(1, int(epochs * 60_000 / 128))
    x, y = common.load_tensors(dataset_for(reference), "train", dataset_dir, config.num_channels, config.image_size,
                               min(60_000, steps * 128))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    for step in range(steps):
        start = (step * 128) % len(x)
        if start + 128 > len(x):
            order = torch.randperm(len(x), generator=generator)
            start = 0
        index = order[start:start + 128]
        loss = F.cross_entropy(model.head(model.backbone(model.normalization(x[index]))), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return str(folder)


# --- one model -------------------------------------------------------------------------------------------------
def evaluate_model(name: str, path: str, args, limits: dict, batches: dict) -> dict:
    model = load_model(path)
    config = model.config
    epsilon = float(config.epsilon)
    dataset = dataset_for(model)
    n = max(limits.values())
    x, y = common.load_tensors(dataset, "test", args.dataset_dir, config.num_channels, config.image_size, n)
    exported = common.export_plain(model)
    export_error = common.check_export(model, exported, x[:256])
    gloro = gloro_certify(model, x[:limits["GloRo"]], args.batch)
    rows = []
    correct = gloro["predictions"] == y[:limits["GloRo"]]
    rows.append({"method": "GloRo (model.certify)", "images": limits["GloRo"],
                 "images_per_s": gloro["images_per_s"], "certified": float(gloro["certified"].float().mean()),
                 "vra": float((gloro["certified"] & correct).float().mean()), "peak_memory_mb": None,
                 "note": f"bound computed once in {gloro['bound_seconds']:.2f} s; forward {gloro['forward_images_per_s']:.0f} img/s"})
    for method in METHODS:
        count = limits[method]
        if count <= 0:
            continue
        spec = {"model": path, "dataset": dataset, "dataset_dir": str(args.dataset_dir), "limit": count,
                "epsilon": epsilon, "method": method, "batch": batches[method], "threads": args.threads,
                "alpha_iterations": args.alpha_iterations, "memory_cap_gib": args.memory_cap_gib,
                "timeout_s": args.child_timeout}
        print(f"  {name}: {method} on {count} images ...", flush=True)
        result = run_method(spec, isolate=not args.quick, exported=exported, x=x)
        if "error" in result:
            rows.append({"method": f"auto_LiRPA {method}", "images": count, "error": result["error"]})
            continue
        certified = torch.tensor(result["certified"])
        predictions = torch.tensor(result["predictions"])
        ours = gloro["certified"][:count]
        same_prediction = float((predictions == gloro["predictions"][:count]).float().mean())
        rows.append({
            "method": f"auto_LiRPA {method}", "images": count, "images_per_s": result["images_per_s"],
            "certified": float(certified.float().mean()),
            "vra": float((certified & (predictions == y[:count])).float().mean()),
            "gloro_certified_same_images": float(ours.float().mean()),
            "both": float((certified & ours).float().mean()),
            "local_only": float((certified & ~ours).float().mean()),
            "gloro_only": float((~certified & ours).float().mean()),
            "union": float((certified | ours).float().mean()),
            "median_lower_margin": float(torch.tensor(result["lower_margin"]).median()),
            "peak_memory_mb": result["peak_memory_mb"],
            "peak_memory_mb_per_image": result["peak_memory_mb"] / min(batches[method], count),
            "same_prediction_as_gloro": same_prediction,
            "gloro_speedup": gloro["images_per_s"] / result["images_per_s"],
        })
    return {"name": name, "path": path, "dataset": dataset, "epsilon": epsilon, "backbone": config.backbone,
            "lipschitz_constant": float(model.lipschitz_constant()), "export_max_abs_error": export_error,
            "clean_accuracy": float(correct.float().mean()), "rows": rows}


def markdown(results: dict) -> str:
    title = "GloRo certificate vs local bounds"
    lines = [f"# {title} (auto_LiRPA {results['auto_lirpa_version']})"
             + (" — partial: the run was still going" if results.get("partial") else ""), "",
             common.machine_line(results["machine"]) + f" (load after: {results['load_after']})", "",
             f"Command: `{results['command']}`", "",
             "Throughput is per CPU second of the measuring thread (one torch thread), so other jobs on the "
             "machine do not distort it; wall seconds are in the JSON.", ""]
    for model in results["models"]:
        lines += [f"## {model['name']}: `{model['backbone']}`, {model['dataset']}, L2 ε = {model['epsilon']:.4g}",
                  "", f"Guaranteed Lipschitz bound {model['lipschitz_constant']:.4g}; clean accuracy "
                  f"{model['clean_accuracy']:.4f}; exported network matches the model's logits to "
                  f"{model['export_max_abs_error']:.1e}.", "",
                  "| method | images | images / CPU s | GloRo faster by | certified | VRA | GloRo certified (same images) "
                  "| certified by local only | by GloRo only | union | peak memory (MB) / image |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in model["rows"]:
            if "error" in row:
                lines.append(f"| {row['method']} | {row['images']} | {row['error']} | | | | | | | | |")
                continue
            lines.append(
                f"| {row['method']} | {row['images']} | {common.fmt(row['images_per_s'])} | "
                f"{common.fmt(row.get('gloro_speedup'))}{'×' if row.get('gloro_speedup') else ''} | "
                f"{row['certified']:.4f} | {row['vra']:.4f} | {common.fmt(row.get('gloro_certified_same_images'))} | "
                f"{common.fmt(row.get('local_only'))} | {common.fmt(row.get('gloro_only'))} | "
                f"{common.fmt(row.get('union'))} | {common.fmt(row.get('peak_memory_mb_per_image'))} |")
        notes = [row["note"] for row in model["rows"] if row.get("note")]
        lines += [""] + [f"GloRo: {note}." for note in notes] + [""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-model", default="/work/models/mnist_2c2f")
    parser.add_argument("--cifar-model", default="/work/models/cifar_liresnet", help="'' to skip")
    parser.add_argument("--dataset_dir", default=str(common.DEFAULT_DATA))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256, help="GloRo certify batch")
    parser.add_argument("--limit", type=int, default=10_000, help="test images for GloRo")
    parser.add_argument("--ibp-limit", type=int, default=2000)
    parser.add_argument("--crown-limit", type=int, default=200)
    parser.add_argument("--alpha-limit", type=int, default=10)
    parser.add_argument("--alpha-iterations", type=int, default=20)
    parser.add_argument("--cifar-limit", type=int, default=2000, help="CIFAR test images for GloRo")
    parser.add_argument("--cifar-ibp-limit", type=int, default=200)
    parser.add_argument("--cifar-crown-limit", type=int, default=1)
    parser.add_argument("--cifar-alpha-limit", type=int, default=0, help="0: skip α-CROWN on the CIFAR model")
    parser.add_argument("--ce-epochs", type=float, default=3.0, help="epochs of the cross-entropy contrast model")
    parser.add_argument("--memory-cap-gib", type=float, default=8.0)
    parser.add_argument("--child-timeout", type=int, default=1800, help="wall seconds per auto_LiRPA run")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: MNIST only, a few images")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))))
        return
    auto_lirpa = common.import_auto_lirpa()
    info = common.machine_info(args.threads)
    print(common.machine_line(info), flush=True)
    if args.quick:
        args.cifar_model, args.ce_epochs, args.alpha_iterations = "", 40 * 128 / 60_000, 3
        mnist_limits = {"GloRo": 64, "IBP": 16, "CROWN": 4, "alpha-CROWN": 2}
    else:
        mnist_limits = {"GloRo": args.limit, "IBP": args.ibp_limit, "CROWN": args.crown_limit,
                        "alpha-CROWN": args.alpha_limit}
    mnist_batches = {"IBP": 256, "CROWN": 32, "alpha-CROWN": 10}
    started = time.perf_counter()
    models = []
    ce_seconds = None
    stem = "local_bounds_quick" if args.quick else "local_bounds"

    def save(final: bool):
        """Write the results so far (every model as it completes; ``partial`` until the last)."""
        results = {"machine": info, "load_after": [round(v, 2) for v in os.getloadavg()],
                   "auto_lirpa_version": getattr(auto_lirpa, "__version__", "0.3"), "quick": args.quick,
                   "partial": not final,
                   "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
                   "alpha_iterations": args.alpha_iterations, "ce_training_seconds": ce_seconds,
                   "wall_seconds": time.perf_counter() - started, "models": models}
        text = markdown(results)
        return text, common.write_results(stem, text, results, args.out_dir)

    print("GloRo-trained MNIST model", flush=True)
    models.append(evaluate_model("GloRo-trained", args.mnist_model, args, mnist_limits, mnist_batches))
    save(final=False)
    print(f"cross-entropy contrast model ({args.ce_epochs:.3g} epochs)", flush=True)
    ce_start = time.perf_counter()
    ce_path = train_cross_entropy(args.mnist_model, args.dataset_dir, args.ce_epochs)
    ce_seconds = time.perf_counter() - ce_start
    models.append(evaluate_model(f"cross-entropy-trained ({args.ce_epochs:.3g} epochs, same architecture)", ce_path,
                                 args, mnist_limits, mnist_batches))
    if args.cifar_model:
        save(final=False)
        print("CIFAR-10 model", flush=True)
        limits = {"GloRo": args.cifar_limit, "IBP": args.cifar_ibp_limit, "CROWN": args.cifar_crown_limit,
                  "alpha-CROWN": args.cifar_alpha_limit}
        models.append(evaluate_model("GloRo-trained", args.cifar_model, args, limits,
                                     {"IBP": 64, "CROWN": 1, "alpha-CROWN": 1}))
    text, (md_path, json_path) = save(final=True)
    print("\n" + text)
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
