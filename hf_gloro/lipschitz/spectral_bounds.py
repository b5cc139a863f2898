"""Guaranteed upper bounds on spectral norms (L2 operator norms), computed in float64.

These are the only numbers a certificate may rest on. Power iteration (``power_iteration.py``) approaches
the spectral norm from *below* and is used for training only.

Dense layers
    ``‖W‖₂ = sqrt(λ_max(W Wᵀ))`` (or ``WᵀW``, whichever is smaller), exact up to float64 rounding.

Convolutions (zero padding, any stride/dilation/groups), input ``n_h × n_w``
    Let ``N ≥ n + max(pad)`` be a multiple of the stride ``s``. Embedding the input into an ``N × N``
    torus (zeros elsewhere) and cropping the output shows that the zero-padded convolution equals
    ``crop ∘ C ∘ embed``, where ``C`` is the *circular* strided convolution on the torus; ``crop`` and
    ``embed`` have norm ≤ 1, hence ``‖conv‖ ≤ ‖C‖``. For ``C`` the norm is exact in the Fourier domain:
    with ``M = N/s`` and ``K̂(f)`` the ``C_out × C_in`` DFT of the kernel at frequency ``f``,

        ‖C‖ = max_{ν ∈ Z_M²} σ_max( [K̂(ν + aM)]_{a ∈ Z_s²} ) / s,

    the block row stacking the ``s²`` aliased frequencies (this is the space-to-depth view of a strided
    convolution). A real kernel gives ``B_{-ν} = conj(B_ν)`` up to a column permutation, so half of the
    frequencies suffice. A shift of the input (the padding offset) is a unitary on the right and does not
    change the norm.
"""

from __future__ import annotations

import math

import torch

from .numerics import inflate


def _as_float64(tensor: torch.Tensor) -> torch.Tensor:
    """Detached float64 copy on the tensor's own device (a GPU does this work far faster), or on the CPU
    for devices without float64 support (MPS)."""
    device = tensor.device if tensor.device.type in ("cpu", "cuda") else torch.device("cpu")
    return tensor.detach().to(device=device, dtype=torch.float64)


def _largest_singular_value_squared(blocks: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue of ``B Bᴴ`` (or ``Bᴴ B``) for a batch of matrices ``B``, in float64."""
    rows, cols = blocks.shape[-2:]
    gram = blocks @ blocks.mH if rows <= cols else blocks.mH @ blocks
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0.0)


@torch.no_grad()
def dense_spectral_norm_bound(weight: torch.Tensor) -> float:
    """Guaranteed upper bound on ``‖W‖₂`` for a dense matrix (``out × in``), float64 plus slack."""
    if weight.ndim != 2:
        raise ValueError(f"dense bound expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = _as_float64(weight)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or inf; refusing to compute a Lipschitz bound")
    return inflate(math.sqrt(float(_largest_singular_value_squared(w))))


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) == 1:
        return (int(value[0]), int(value[0]))
    return (int(value[0]), int(value[1]))


def circular_embedding_size(
    input_size: int, kernel_size: int, stride: int, padding: int, dilation: int = 1
) -> int:
    """Smallest torus size ``N`` (a multiple of ``stride``) that contains the zero-padded convolution."""
    extent = dilation * (kernel_size - 1) + 1
    output = (input_size + 2 * padding - extent) // stride + 1
    if output < 1:
        raise ValueError(
            f"convolution with kernel {kernel_size}, stride {stride}, padding {padding} "
            f"has no output on an input of size {input_size}"
        )
    size = max(input_size + padding, extent, stride * output)
    return int(math.ceil(size / stride) * stride)


@torch.no_grad()
def conv2d_spectral_norm_bound(
    kernel: torch.Tensor,
    input_size: tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    frequency_chunk: int = 16,
) -> float:
    """Guaranteed upper bound on the L2 operator norm of ``F.conv2d(·, kernel, stride, padding, ...)``.

    Args:
        kernel: ``(C_out, C_in / groups, k_h, k_w)``.
        input_size: ``(n_h, n_w)`` of the input the layer is applied to.
        frequency_chunk: frequencies processed per batched eigen-solve (memory vs. speed).

    Returns:
        ``(1 + slack) · max_ν σ_max(B_ν)/s`` (see module docstring), a float.
    """
    if kernel.ndim != 4:
        raise ValueError(f"conv bound expects a 4-D kernel, got shape {tuple(kernel.shape)}")
    k = _as_float64(kernel)
    if not torch.isfinite(k).all():
        raise ValueError("kernel contains NaN or inf; refusing to compute a Lipschitz bound")
    c_out, c_in_per_group, kh, kw = k.shape
    if c_out % groups:
        raise ValueError(f"out_channels {c_out} not divisible by groups {groups}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    nh, nw = input_size
    big_h = circular_embedding_size(nh, kh, sh, ph, dh)
    big_w = circular_embedding_size(nw, kw, sw, pw, dw)

    # Place the (dilated) taps on the torus; taps beyond the torus fold back, which is what a circular
    # convolution of that size computes.
    torus = torch.zeros(c_out, c_in_per_group, big_h, big_w, dtype=torch.float64, device=k.device)
    for i in range(kh):
        for j in range(kw):
            torus[:, :, (i * dh) % big_h, (j * dw) % big_w] += k[:, :, i, j]
    spectrum = torch.fft.fft2(torus)  # (C_out, C_in/g, N_h, N_w), complex128

    m_h, m_w = big_h // sh, big_w // sw
    # (C_out, C_in/g, s_h, M_h, s_w, M_w): frequency f = ν + a·M  ↔  index a·M + ν.
    spectrum = spectrum.reshape(c_out, c_in_per_group, sh, m_h, sw, m_w)
    # Half of the ν grid suffices (conjugate symmetry); keep ν_w ∈ [0, M_w // 2].
    spectrum = spectrum[..., : m_w // 2 + 1]
    half_w = spectrum.shape[-1]
    out_per_group = c_out // groups
    best = torch.zeros((), dtype=torch.float64, device=k.device)
    for g in range(groups):
        block = spectrum[g * out_per_group : (g + 1) * out_per_group]
        # → (M_h, M_w', C_out/g, C_in/g · s_h · s_w): the stacked aliased blocks B_ν.
        block = block.permute(3, 5, 0, 1, 2, 4).reshape(m_h * half_w, out_per_group, c_in_per_group * sh * sw)
        for start in range(0, block.shape[0], frequency_chunk):
            chunk = block[start : start + frequency_chunk]
            best = torch.maximum(best, _largest_singular_value_squared(chunk).max())
    return inflate(math.sqrt(float(best)) / math.sqrt(sh * sw))
