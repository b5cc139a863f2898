"""Floating-point conventions shared by every guaranteed bound.

Guaranteed bounds are computed in float64 and then inflated by a relative slack that dominates the
rounding error of the float64 computation itself (an eigenvalue solver is backward stable: the computed
largest eigenvalue of a Hermitian ``H`` is exact for some ``H + E`` with ``|E| <= c·n·u·|H|``, u = 1.1e-16;
an FFT of length N adds ``O(log N · u)`` relative error). For every size this package builds, those terms
are below 1e-10, so the slack below is at least four orders of magnitude larger than what it must cover.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Relative slack multiplied onto every guaranteed per-layer bound: ``bound = (1 + slack) · computed``.
BOUND_RELATIVE_SLACK: float = 1e-6

#: Unit roundoff of float64.
FLOAT64_UNIT_ROUNDOFF: float = 2.0**-53


#: Bounds are rounded *up* to this many significant digits, so that the same weights give the same bound
#: in every process: multi-threaded float64 reductions may differ in their last bits between thread counts.
BOUND_SIGNIFICANT_DIGITS: int = 9


def round_up(values: torch.Tensor) -> torch.Tensor:
    """Round positive float64 values up to :data:`BOUND_SIGNIFICANT_DIGITS` significant digits (never down)."""
    values = values.to(torch.float64)
    positive = values > 0
    exponent = torch.floor(torch.log10(torch.where(positive, values, torch.ones_like(values))))
    quantum = torch.pow(10.0, exponent - (BOUND_SIGNIFICANT_DIGITS - 1))
    steps = torch.ceil(values / quantum)
    rounded = steps * quantum
    rounded = torch.where(rounded < values, (steps + 1) * quantum, rounded)  # guard the division's rounding
    return torch.where(positive, rounded, values)


def inflate(value: float) -> float:
    """``value · (1 + BOUND_RELATIVE_SLACK)`` rounded up: the rounding-safe, reproducible form of a bound."""
    return float(round_up(torch.tensor(float(value) * (1.0 + BOUND_RELATIVE_SLACK), dtype=torch.float64)))


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Disable TF32 (CUDA) and reduced-precision reductions while a certificate is computed.

    TF32 keeps only 10 mantissa bits, which would make a float32 forward pass and a float32 bound
    disagree far beyond the documented slack.
    """
    cuda_matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)


def _bit_checksum(tensor: torch.Tensor) -> int:
    """Sum of the tensor's bit patterns as integers, accumulated in int64.

    Changing any single element changes it; so does scaling a tensor by 2 (every exponent moves), which
    an XOR hash can miss. One vectorised pass over the data.
    """
    flat = tensor.contiguous().flatten()
    size = flat.element_size()
    bits = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}.get(size, torch.uint8))
    return int(bits.sum(dtype=torch.int64))


def weights_fingerprint(*tensors: torch.Tensor) -> tuple:
    """A cheap identity of tensors' current values, used to invalidate cached bounds.

    Combines storage address, autograd version counter (bumped by every in-place update, including
    optimizer steps and ``load_state_dict``) and a checksum of the bit patterns (which also catches writes
    through ``.data`` that bypass the version counter). It guards against accidents, not against an
    adversary who controls the process's memory.
    """
    return tuple(
        (t.data_ptr(), t._version, tuple(t.shape), t.dtype, _bit_checksum(t.detach())) for t in tensors
    )
