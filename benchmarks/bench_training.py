#!/usr/bin/env python
"""GloRo training step vs plain cross-entropy training step of the same backbone: time and peak memory.

    python benchmarks/bench_training.py [--backbones gloro_2c2f gloro_6c2f] [--threads 1] [--repeats 30]

* **Step time** (one process): the two steps are measured side by side, *interleaved* (GloRo, plain, GloRo,
  plain, …) after warm-up, each on its own copy of the model and its own Adam optimizer, and the medians are
  compared. GloRo step = forward in train mode (``power_iterations`` warm-started power-iteration steps,
  differentiable Lipschitz estimate, per-pair margin constants, bottom logit) + GloRo cross-entropy on the
  ``m + 1`` logits + backward + Adam. Plain step = ``head(backbone(normalization(x)))`` + cross-entropy +
  backward + Adam. The guaranteed bound used for certification is not involved in either.
* **Peak memory**: each variant runs in a fresh subprocess. After one warm-up step, a background thread samples
  glibc's in-use heap (``mallinfo2``) during the measured steps; the figure is the peak minus the in-use heap
  before them (activations, gradients and temporaries of a step: the CPU analogue of CUDA's
  ``max_memory_allocated`` delta). Also reported: bytes saved for backward per step, and the growth of the
  peak RSS from before the first step (includes one-time allocations such as kernel caches and Adam state).

Prints a Markdown table (and ``--json`` writes the raw numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

SHAPES = {  # name: (channels, size, classes, batch)
    "gloro_2c2f": (1, 28, 10, 256),
    "gloro_4c3f": (1, 28, 10, 256),
    "gloro_6c2f": (3, 32, 10, 256),
    "liresnet_l6w128": (3, 32, 10, 128),
    # The LiResNet reference code's small CIFAR network (depth 6, width 64, 512-wide neck, 8-layer Cholesky-
    # orthogonal MLP, LLN head) at its batch 256; the reference trains it at 143 img/s on one core here.
    "liresnet_reference": (3, 32, 10, 256),
    # recipes/configs/cifar10_cpu_budget.yaml's network and batch.
    "cifar10_cpu_budget": (3, 32, 10, 128),
}
#: Names that are not timm names: (backbone, backbone_kwargs, head_normalization).
VARIANTS = {
    "liresnet_reference": ("liresnet_l6w128", {"width": 64, "depth": 6, "neck_features": 512, "mlp_depth": 8}, "lln"),
    "cifar10_cpu_budget": ("liresnet_l6w128", {"width": 64, "depth": 6, "neck_features": 512}, "lln"),
}


def build(backbone: str, power_iterations: int, seed: int = 0):
    import hf_gloro

    channels, size, classes, _ = SHAPES[backbone]
    torch.manual_seed(seed)
    name, kwargs, head = VARIANTS.get(backbone, (backbone, None, "none"))
    config = hf_gloro.GloRoConfig(backbone=name, backbone_kwargs=kwargs, head_normalization=head,
                                  num_channels=channels, image_size=size, epsilon=0.3,
                                  power_iterations=power_iterations, num_labels=classes)
    return hf_gloro.GloRoForImageClassification(config).train()


def make_step(model, kind: str, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def gloro():
        outputs = model(x, epsilon=0.45)
        loss = F.cross_entropy(outputs.gloro_logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain():
        logits = model.head(model.backbone(model.normalization(x)))
        loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return gloro if kind == "gloro" else plain


def batch(backbone: str):
    channels, size, classes, batch_size = SHAPES[backbone]
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(batch_size, channels, size, size, generator=generator),
            torch.randint(0, classes, (batch_size,), generator=generator))


def time_interleaved(backbone: str, power_iterations: int, repeats: int, warmup: int) -> dict:
    x, y = batch(backbone)
    steps = {kind: make_step(build(backbone, power_iterations), kind, x, y) for kind in ("gloro", "plain")}
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {kind: [] for kind in steps}
    for _ in range(repeats):
        for kind, step in steps.items():
            start = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - start)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    batch_size = x.shape[0]
    return {"gloro_ms": medians["gloro"] * 1e3, "plain_ms": medians["plain"] * 1e3,
            "time_ratio": medians["gloro"] / medians["plain"],
            "gloro_images_per_s": batch_size / medians["gloro"], "plain_images_per_s": batch_size / medians["plain"]}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _HeapSampler:
    """Peak of glibc's in-use heap bytes (``mallinfo2``: arena ``uordblks`` + mmapped ``hblkhd``), sampled by a
    background thread every ~50 µs — the CPU analogue of ``torch.cuda.max_memory_allocated``."""

    def __init__(self):
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        self._mallinfo = libc.mallinfo2
        self._threading = threading
        self.peak = 0
        self._running = False

    def in_use(self) -> int:
        info = self._mallinfo()
        return int(info.uordblks + info.hblkhd)

    def __enter__(self):
        self.peak = self.in_use()
        self._running = True

        def sample():
            while self._running:
                self.peak = max(self.peak, self.in_use())
                time.sleep(5e-5)

        self._thread = self._threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, self.in_use())


def memory_child(backbone: str, kind: str, power_iterations: int, steps: int) -> dict:
    x, y = batch(backbone)
    model = build(backbone, power_iterations)
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    step = make_step(model, kind, x, y)
    rss_before = _rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()  # warm-up: optimizer state and lazily created kernels/caches
        saved_per_step = saved
        sampler = _HeapSampler()
        base = sampler.in_use()  # parameters, Adam state (grads were freed by zero_grad(set_to_none=True))
        with sampler:
            for _ in range(steps):
                step()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_step_mb": (sampler.peak - base) / 2**20, "peak_rss_growth_mb": (peak_rss - rss_before) / 2**20,
            "saved_for_backward_mb": saved_per_step / 2**20}


def measure_memory(backbone: str, kind: str, power_iterations: int, threads: int, steps: int = 5) -> dict:
    command = [sys.executable, __file__, "--memory-child", backbone, kind, str(power_iterations), str(steps),
               "--threads", str(threads)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["gloro_2c2f", "gloro_6c2f"], choices=sorted(SHAPES))
    parser.add_argument("--power-iterations", nargs="+", type=int, default=[10, 5, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the raw results to this file")
    parser.add_argument("--no-memory", action="store_true", help="time only (skip the memory subprocesses)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="time with glibc's default malloc (the trainer's retain_cpu_memory=False)")
    parser.add_argument("--memory-child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_child:
        backbone, kind, iterations, steps = args.memory_child
        print(json.dumps(memory_child(backbone, kind, int(iterations), int(steps))))
        return

    import hf_gloro  # noqa: F401  (timm registration before the table header)
    from hf_gloro.cpu_allocator import retain_freed_memory

    # As GloRoTrainer.train() does on the CPU (retain_cpu_memory=True); the memory subprocesses are unaffected.
    retained = False if args.default_malloc else retain_freed_memory()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU(s), "
          f"load {os.getloadavg()[0]:.1f}, freed memory retained: {retained}; "
          f"{args.repeats} interleaved repetitions after {args.warmup} warm-up steps; "
          "medians\n")
    print("| backbone | batch | power its/step | GloRo step (ms) | plain step (ms) | time ratio | GloRo / plain img/s | "
          "peak step memory GloRo / plain (MB) | memory ratio | saved-for-backward GloRo / plain (MB) | "
          "peak-RSS growth GloRo / plain (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for backbone in args.backbones:
        skipped = {"peak_step_mb": math.nan, "peak_rss_growth_mb": math.nan, "saved_for_backward_mb": math.nan}
        plain_memory = skipped if args.no_memory else measure_memory(backbone, "plain", 1, args.threads)
        for iterations in args.power_iterations:
            timing = time_interleaved(backbone, iterations, args.repeats, args.warmup)
            gloro_memory = skipped if args.no_memory else measure_memory(backbone, "gloro", iterations, args.threads)
            memory_ratio = gloro_memory["peak_step_mb"] / plain_memory["peak_step_mb"]
            row = {"backbone": backbone, "batch": SHAPES[backbone][3], "power_iterations": iterations, **timing,
                   "gloro_memory": gloro_memory, "plain_memory": plain_memory, "memory_ratio": memory_ratio}
            results.append(row)
            print(f"| {backbone} | {row['batch']} | {iterations} | {timing['gloro_ms']:.1f} | {timing['plain_ms']:.1f} "
                  f"| **{timing['time_ratio']:.3f}** | {timing['gloro_images_per_s']:.0f} / {timing['plain_images_per_s']:.0f} "
                  f"| {gloro_memory['peak_step_mb']:.1f} / "
                  f"{plain_memory['peak_step_mb']:.1f} | **{memory_ratio:.3f}** | "
                  f"{gloro_memory['saved_for_backward_mb']:.1f} / {plain_memory['saved_for_backward_mb']:.1f} | "
                  f"{gloro_memory['peak_rss_growth_mb']:.1f} / {plain_memory['peak_rss_growth_mb']:.1f} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": args.threads, "repeats": args.repeats, "retained_memory": retained,
                       "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
