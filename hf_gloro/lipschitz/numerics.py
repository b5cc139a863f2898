"""Floating-point conventions shared by every guaranteed bound and every certificate.

Guaranteed bounds are computed in float64 and then inflated by a relative slack that dominates the
rounding error of the float64 computation itself (an eigenvalue solver is backward stable: the computed
largest eigenvalue of a Hermitian ``H`` is exact for some ``H + E`` with ``|E| <= c·n·u·|H|``, u = 1.1e-16;
an FFT of length N adds ``O(log N · u)`` relative error). For every size this package builds, those terms
are below 1e-10, so the slack below is at least four orders of magnitude larger than what it must cover.

The rounding of the *network's own* forward pass (float32 by default) is a different matter, handled by
:mod:`hf_gloro.lipschitz.float_error` with the unit roundoffs defined here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

try:
    import xxhash

    def _hasher(data: bytes = b""):
        return xxhash.xxh3_128(data)
except ImportError:  # pragma: no cover - e.g. the remote-code copy of this file without hf-gloro's dependencies
    import hashlib

    def _hasher(data: bytes = b""):
        return hashlib.blake2b(data, digest_size=16)

#: Relative slack multiplied onto every guaranteed per-layer bound: ``bound = (1 + slack) · computed``.
BOUND_RELATIVE_SLACK: float = 1e-6

#: Unit roundoff of float64.
FLOAT64_UNIT_ROUNDOFF: float = 2.0**-53

#: Unit roundoff ``u`` (half the machine epsilon) of each floating-point dtype: ``fl(a ∘ b) = (a ∘ b)(1 + δ)``,
#: ``|δ| ≤ u`` for normal results.
UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}

#: Smallest positive *normal* number of each dtype. Results below it may be subnormal or flushed to zero
#: (FTZ/DAZ): the absolute error of one such operation is below this value.
SMALLEST_NORMAL: dict[torch.dtype, float] = {
    torch.float64: 2.0**-1022,
    torch.float32: 2.0**-126,
    torch.float16: 2.0**-14,
    torch.bfloat16: 2.0**-126,
}

#: The dtypes in which this package issues certificates.
CERTIFIED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)


def gamma(n: int | float, unit_roundoff: float) -> float:
    """Higham's ``γ_n = n·u / (1 − n·u)``: a dot product of length ``n``, summed in *any* order (with or without
    FMA), satisfies ``|fl(wᵀx) − wᵀx| ≤ γ_n·|w|ᵀ|x|`` (Higham, *Accuracy and Stability*, Lemma 3.1, §3.1)."""
    nu = float(n) * unit_roundoff
    if nu >= 0.5:
        raise ValueError(f"n·u = {nu:.3g} is too large for a rounding-error bound (n = {n}, u = {unit_roundoff})")
    return nu / (1.0 - nu)


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


# --- the numerics under which certified forward passes run ------------------------------------------------------

def _fp32_precision_leaves() -> list:
    """The per-backend float32-precision switches (PyTorch ≥ 2.9 API): cuBLAS, cuDNN conv/RNN, oneDNN matmul/conv/RNN."""
    backends = torch.backends
    leaves = [backends.cuda.matmul, backends.cudnn.conv, backends.cudnn.rnn]
    mkldnn = getattr(backends, "mkldnn", None)
    for name in ("matmul", "conv", "rnn"):
        leaf = getattr(mkldnn, name, None)
        if leaf is not None:
            leaves.append(leaf)
    return [leaf for leaf in leaves if hasattr(leaf, "fp32_precision")]


@contextlib.contextmanager
def certification_numerics() -> Iterator[None]:
    """IEEE float32 everywhere and only algorithms that obey the dot-product error model, while certifying.

    * **TF32 / bf16 "fast math" off** for cuBLAS, cuDNN *and* oneDNN (matmuls and convolutions): TF32 keeps
      10 mantissa bits (``u = 2⁻¹¹``), which the float32 error analysis does not assume. Set through the
      per-backend ``fp32_precision = "ieee"`` switches only: mixing them with the legacy ``allow_tf32`` flags
      makes PyTorch raise.
    * **cuDNN off** (CUDA): cuDNN may pick Winograd or FFT convolutions, whose rounding errors are not bounded
      by ``γ_n·|W|·|x|``. Without it, CUDA convolutions run as im2col + cuBLAS GEMM (plain dot products).
      On the CPU, PyTorch asks oneDNN for *direct* convolutions (it never requests Winograd), which are dot
      products as well.

    Everything is restored on exit.
    """
    leaves = _fp32_precision_leaves()
    saved = [leaf.fp32_precision for leaf in leaves]
    cudnn_enabled = torch.backends.cudnn.enabled
    try:
        for leaf in leaves:
            leaf.fp32_precision = "ieee"
        torch.backends.cudnn.enabled = False  # (cudnn.flags() would read the legacy TF32 flag and may raise)
        yield
    finally:
        torch.backends.cudnn.enabled = cudnn_enabled
        for leaf, value in zip(leaves, saved):
            leaf.fp32_precision = value


#: Former name of :func:`certification_numerics` (it only switched TF32 off).
exact_matmul = certification_numerics


def autocast_active(device_type: str) -> bool:
    """Whether ``torch.autocast`` is enabled for ``device_type`` in the calling context."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, TypeError):  # device types without autocast support
        return False


# --- content digests: what cached bounds are keyed on ----------------------------------------------------------

def tensor_digest(tensor: torch.Tensor) -> bytes:
    """A 128-bit content hash (XXH3-128) of a tensor's bytes, dtype and shape.

    Any change of any element (a write through ``.data``, a permutation, sign flips, balanced exponent shifts)
    changes it except with probability ~2⁻¹²⁸: an integrity check against accidents, not against an adversary
    who controls the process. ~20 GB/s on one core (BLAKE2b where xxhash is not installed); tensors on an
    accelerator are copied to the host first.
    """
    t = tensor.detach()
    flat = t.contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    digest = _hasher(f"{t.dtype}|{tuple(t.shape)}".encode())
    if flat.numel():
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.digest()


def content_digest(tensors: Iterable[torch.Tensor]) -> bytes:
    """One digest over several tensors (order matters)."""
    digest = _hasher()
    for tensor in tensors:
        digest.update(tensor_digest(tensor))
    return digest.digest()
