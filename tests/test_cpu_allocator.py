"""``retain_freed_memory``: re-allocated training-sized buffers stop page-faulting (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_SCRIPT = r"""
import ctypes, resource, sys, torch
from hf_gloro.cpu_allocator import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, retain_freed_memory
# Start from glibc's initial thresholds (128 KiB; they otherwise drift with whatever the imports allocated), so
# the baseline hands every buffer back and faults it in again, deterministically.
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024) == 1
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def step():  # a training step's pattern: several activation-sized buffers live at once, then all freed
    buffers = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(8)]  # 8 × 16 MiB
    del buffers
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_step(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = _faults_per_step("default"), _faults_per_step("retain")
    pages = 8 * 16 * 2**20 / 4096
    assert default > 0.5 * pages  # glibc gives the 128 MiB back and faults it in again every step
    assert retained < 0.05 * pages, (default, retained)


def test_trainer_argument_defaults_on():
    from hf_gloro.trainer import GloRoTrainingArguments

    assert GloRoTrainingArguments(output_dir="unused").retain_cpu_memory is True
