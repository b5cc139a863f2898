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


def inflate(value: float) -> float:
    """Return ``value · (1 + BOUND_RELATIVE_SLACK)``, the rounding-safe version of a computed bound."""
    return float(value) * (1.0 + BOUND_RELATIVE_SLACK)


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


def _bit_checksums(tensor: torch.Tensor) -> tuple[int, int, int]:
    """XOR hash, sum of the bit patterns, and the sum over even positions (catches swaps) of a tensor."""
    flat = tensor.contiguous().flatten()
    xor = torch.hash_tensor(flat).view(torch.int64).item()
    if flat.element_size() == 4:
        bits = flat.view(torch.int32)
    elif flat.element_size() == 8:
        bits = flat.view(torch.int64)
    elif flat.element_size() == 2:
        bits = flat.view(torch.int16)
    else:
        bits = flat.view(torch.uint8)
    return xor, int(bits.sum(dtype=torch.int64)), int(bits[::2].sum(dtype=torch.int64))


def weights_fingerprint(*tensors: torch.Tensor) -> tuple:
    """A cheap identity of tensors' current values, used to invalidate cached bounds.

    Combines storage address, autograd version counter (bumped by every in-place update, including
    optimizer steps and ``load_state_dict``) and checksums of the bit patterns (which also catch writes
    through ``.data`` that bypass the version counter). It guards against accidents, not against an
    adversary who controls the process's memory.
    """
    parts = []
    for tensor in tensors:
        detached = tensor.detach()
        parts.append(
            (detached.data_ptr(), tensor._version, tuple(detached.shape), str(detached.dtype))
            + _bit_checksums(detached)
        )
    return tuple(parts)
