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
    convolution); ``max_ν σ_max(B_ν)²`` is bounded by :func:`max_eigenvalue_upper_bound` (verified
    Cholesky factorisations, exact eigen-solves only where a frequency exceeds the running maximum). A real
    kernel gives ``B_{-ν} = conj(B_ν)`` up to a column permutation, so half of the frequencies suffice. A
    shift of the input (the padding offset) is a unitary on the right and does not change the norm.
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


def _gram(blocks: torch.Tensor) -> torch.Tensor:
    """``B Bᴴ`` or ``Bᴴ B``, whichever is smaller (same nonzero spectrum)."""
    rows, cols = blocks.shape[-2:]
    return blocks @ blocks.mH if rows <= cols else blocks.mH @ blocks


def _largest_singular_value_squared(blocks: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue of ``B Bᴴ`` (or ``Bᴴ B``) for a batch of matrices ``B``, in float64."""
    return torch.linalg.eigvalsh(_gram(blocks))[..., -1].clamp_min(0.0)


def max_eigenvalue_upper_bound(grams: torch.Tensor, reference: float = 0.0) -> tuple[float, float]:
    """Guaranteed upper bound on ``max_f λ_max(H_f)`` for a batch of Hermitian PSD float64 matrices.

    A full eigen-solve per matrix is the expensive part of the convolution bound, and only the maximum
    over all frequencies matters. So each matrix is *verified* to lie below a threshold ``T`` by a float64
    Cholesky factorisation of ``T·I − H_f`` (several times cheaper than an eigen-solve), and only the
    matrices that fail get an exact eigen-solve.

    * ``T = reference · (1 + 1e-7)``, where ``reference`` is the largest exact eigenvalue seen so far (pass
      the returned value to the next batch); when there is none yet, the matrix with the largest
      power-iteration estimate is solved exactly first.
    * If the factorisation succeeds, ``T·I − H_f + ΔA ⪰ 0`` with ``|ΔA| ≤ γ_{n+1}|R̃ᴴ||R̃|`` (Higham,
      *Accuracy and Stability of Numerical Algorithms*, Thm 10.5), hence
      ``λ_max(H_f) ≤ T + γ·trace(T·I − H_f) ≤ T·(1 + γ·n)``; we use the generous ``γ = 16(n+1)u`` for
      complex arithmetic, plus ``4u`` for forming ``T·I − H``.
    * Exact eigen-solves are backward stable: their values get ``1 + 32·n·u``.

    Returns ``(upper_bound, reference)``.
    """
    n = grams.shape[-1]
    unit = 2.0**-53
    eigen_slack = 1.0 + 32 * n * unit
    if reference <= 0.0:
        vector = torch.ones(grams.shape[0], n, 1, dtype=grams.dtype, device=grams.device)
        for _ in range(8):
            vector = grams @ vector
            vector = vector / vector.norm(dim=1, keepdim=True).clamp_min(1e-300)
        estimates = (vector.mH @ grams @ vector).real.reshape(-1)
        reference = float(torch.linalg.eigvalsh(grams[estimates.argmax()])[-1].clamp_min(0.0))
    threshold = reference * (1.0 + 1e-7) + 1e-300
    identity = torch.eye(n, dtype=grams.dtype, device=grams.device)
    _, info = torch.linalg.cholesky_ex(threshold * identity - grams)
    bound = threshold * (1.0 + 16 * (n + 1) * unit * n + 4 * unit)
    failed = (info != 0).nonzero().reshape(-1)
    if len(failed):
        exact = float(torch.linalg.eigvalsh(grams[failed])[..., -1].max())
        reference = max(reference, exact)
        bound = max(bound, exact * eigen_slack)
    return max(bound, reference * eigen_slack), reference


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
    frequency_chunk: int = 32,
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
    m_h, m_w = big_h // sh, big_w // sw

    # Frequencies ν (half of the ν_w range suffices: conjugate symmetry) and their s_h·s_w aliases
    # f = ν + a·M, ordered (ν_h, ν_w, a_h, a_w).
    nu_h, nu_w = torch.arange(m_h), torch.arange(m_w // 2 + 1)
    alias_h, alias_w = torch.arange(sh), torch.arange(sw)
    f_h = (nu_h[:, None, None, None] + alias_h[None, None, :, None] * m_h).expand(-1, len(nu_w), sh, sw)
    f_w = (nu_w[None, :, None, None] + alias_w[None, None, None, :] * m_w).expand(len(nu_h), -1, sh, sw)
    # The kernel's DFT on the torus, directly at those frequencies: K̂(f) = Σ_t K_t·exp(−2πi⟨f, t⟩/N),
    # a (frequencies × taps) @ (taps × channels) product. Taps beyond the torus wrap, as they must.
    t_h = (torch.arange(kh) * dh).repeat_interleave(kw)
    t_w = (torch.arange(kw) * dw).repeat(kh)
    phase_h = f_h.reshape(-1, 1).double() * t_h[None].double() / big_h
    phase_w = f_w.reshape(-1, 1).double() * t_w[None].double() / big_w
    angle = -2 * math.pi * (phase_h + phase_w)
    cos, sin = angle.cos().to(k.device), angle.sin().to(k.device)
    aliases = sh * sw
    out_per_group = c_out // groups
    best = reference = 0.0
    for g in range(groups):
        taps = k[g * out_per_group : (g + 1) * out_per_group].permute(2, 3, 0, 1).reshape(kh * kw, -1)
        for start in range(0, cos.shape[0], frequency_chunk * aliases):
            rows = slice(start, start + frequency_chunk * aliases)
            spectrum = torch.complex(cos[rows] @ taps, sin[rows] @ taps)  # (F·s², C_out/g · C_in/g)
            # B_ν = [K̂(ν + a·M)]_a stacked along the input side: (F, C_out/g, s²·C_in/g).
            blocks = spectrum.reshape(-1, aliases, out_per_group, c_in_per_group).permute(0, 2, 1, 3)
            blocks = blocks.reshape(-1, out_per_group, aliases * c_in_per_group)
            bound, reference = max_eigenvalue_upper_bound(_gram(blocks), reference)
            best = max(best, bound)
    return inflate(math.sqrt(best) / math.sqrt(sh * sw))
