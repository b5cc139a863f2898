"""L∞ certificates: guaranteed ``∞→2`` operator-norm bounds for the first affine layer, and the prefix constants.

Threat model ``norm="linf"``: every ``x'`` with ``‖x' − x‖∞ ≤ ε`` (pixel scale). Everything after the input stays
an L2 analysis; only the constants that say how far the activations can move *per unit of input distance* change.

Prefix constants
    Let ``P_ℓ`` bound ``‖z_ℓ(x') − z_ℓ(x)‖₂ / ‖x' − x‖∞`` for the exact activations ``z_ℓ`` entering leaf ``ℓ``
    (``z_0 = x``, ``d`` input elements). Then

    * ``P_0 = √d`` (``‖v‖₂ ≤ √d·‖v‖∞``), and ``P_{ℓ+1} ≤ P_ℓ·L_ℓ`` for every leaf with L2 bound ``L_ℓ``;
    * while only *∞-contractive* leaves have run (input normalisation ``(x − μ)/σ``: ``‖·‖∞→∞ = max 1/σ``, which
      is also its L2 bound; MinMax, ReLU, Flatten: ∞→∞ norm 1) we also track ``Q_ℓ ≥ ‖Δz_ℓ‖∞/‖Δx‖∞``; at the first
      dense or convolution leaf ``a`` with a guaranteed ``B ≥ ‖A_a‖∞→2``,
      ``P_{a+1} = min(P_a·L_a, Q_a·B)`` (``‖A Δz‖₂ ≤ B·‖Δz‖∞ ≤ B·Q_a·‖Δx‖∞``). After it ``Q`` is not tracked.

    With ``r = ε∞`` the float-sound ball analysis of :mod:`hf_gloro.lipschitz.float_error` carries over unchanged
    (it only uses "exact input norm of leaf ℓ ≤ S_ℓ + P_ℓ·r"), and the margin constants are ``K_ji = P_L·‖ŵ_j − ŵ_i‖₂``
    (the head is L2 → ℝ: ``|Δ(y_j − y_i)| ≤ ‖ŵ_j − ŵ_i‖₂·‖Δz_L‖₂``). For the L2 threat model ``P_0 = 1`` and the
    same recursion without the ∞ branch gives exactly the product of the chain's bounds.

    When the first affine layer sits inside a composite leaf (a :class:`~hf_gloro.lipschitz.graph.LipschitzGraph`
    of an adapted timm backbone), no ``B`` is available and ``P = √d·Π L`` (sound, just looser).

∞→2 bounds of a matrix ``A`` (``m × n``; ``a_k`` its columns, ``a^i`` its rows), all ≥ ``max_{‖x‖∞≤1}‖Ax‖₂``
    (a) ``√n·‖A‖₂`` — ``‖x‖₂ ≤ √n‖x‖∞``; uses the guaranteed spectral bound.
    (b) ``Σ_k ‖a_k‖₂`` — ``Ax = Σ_k x_k a_k`` and the triangle inequality ("sum over inputs of the L2 norm of their
        outgoing weights", the GloRo snapshot's bound).
    (c) ``‖ |A|·1 ‖₂ = √(Σ_i ‖a^i‖₁²)`` — each output ``|a^i·x| ≤ ‖a^i‖₁`` when ``‖x‖∞ ≤ 1``.
    (e) ``√(1ᵀ|AᵀA|1)`` — ``‖Ax‖₂² = xᵀGx = Σ_kl G_kl x_k x_l ≤ Σ_kl |G_kl|`` with ``G = AᵀA``. It dominates (b)
        (``|G_kl| ≤ ‖a_k‖‖a_l‖``) and (c) (``|G| ≤ |A|ᵀ|A|`` entrywise), and is exact for ``A ≥ 0``. Formed
        explicitly, so only for ``n ≤`` :data:`GRAM_MAX_INPUTS`.
    The bound is the minimum of those computed; (a) wins for near-orthogonal layers, (c)/(e) for sparse or
    one-signed ones.

Convolutions (any stride, padding, dilation, groups) at the real input size
    ``A`` is the implicit matrix of ``F.conv2d`` (rows: output channel × output position, columns: input channel ×
    pixel). All of (b), (c), (e) are computed *exactly for that matrix*, not via a torus: row ℓ1 norms are the
    convolution of an all-ones image with ``|K|`` (border windows automatically lose their outside taps), column
    squared norms are the transposed convolution of an all-ones output with ``K∘K`` (a pixel's outgoing weights;
    for stride ``s`` each pixel meets only the taps congruent to it modulo ``s``, which the transposed convolution
    accounts for), and ``G``'s columns are ``convᵀ(conv(e_k))``. (a) uses the guaranteed circulant bound.

Rounding
    Everything is computed in float64 from the float32 (or float64) values the forward uses. Sums of
    non-negative terms have relative error ≤ ``γ_N`` (``N`` terms); the entries of the formed ``G`` have absolute
    error ≤ ``γ_R·(|A|ᵀ|A|)_kl`` (``R`` terms each, Higham Lemma 3.1), whose sum is ``≤ γ_R·(c)²`` and is added
    explicitly. The result is then inflated by :data:`~hf_gloro.lipschitz.numerics.BOUND_RELATIVE_SLACK` (1e-6,
    far above the remaining ``γ_N`` terms for every size allowed) and rounded up (:func:`inflate`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .numerics import inflate
from .spectral_bounds import _pair, conv2d_spectral_norm_bound, dense_spectral_norm_bound

#: The Gram bound (e) is formed only for layers with at most this many inputs (``G`` is ``n × n`` float64).
GRAM_MAX_INPUTS: int = 4096

#: ... and only while forming it costs at most this many multiply-adds (rows × inputs × taps).
GRAM_MAX_WORK: float = 1e9

_U64 = 2.0**-53


def _gamma64(n: float) -> float:
    nu = n * _U64
    return nu / (1.0 - nu)


def _finite_float64(tensor: torch.Tensor, what: str) -> torch.Tensor:
    t = tensor.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf; refusing to compute an ∞→2 bound")
    return t


def _guaranteed(value: float, terms: float) -> float:
    """``value`` (a float64 sum/sqrt of non-negative terms) made an upper bound: the float64 rounding (``γ_terms``)
    and squares that underflowed (``√terms·2⁻⁵⁰⁰`` absolute, far above ``√(terms·2⁻¹⁰⁷⁴)``), then :func:`inflate`."""
    return inflate(value * (1.0 + _gamma64(terms + 4)) + math.sqrt(terms) * 2.0**-500)


# --- dense ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def dense_linf_to_l2_bounds(weight: torch.Tensor, spectral_bound: float | None = None) -> dict[str, float]:
    """Guaranteed upper bounds (a), (b), (c) and, for ``n ≤`` :data:`GRAM_MAX_INPUTS`, (e) on ``‖W‖∞→2`` of a dense
    ``m × n`` weight (see the module docstring). ``spectral_bound``: a guaranteed ``‖W‖₂`` if already known."""
    if weight.ndim != 2:
        raise ValueError(f"dense bound expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = _finite_float64(weight, "weight")
    m, n = w.shape
    spectral = dense_spectral_norm_bound(weight) if spectral_bound is None else float(spectral_bound)
    bounds = {"sqrt_d_spectral": inflate(math.sqrt(n) * spectral * (1.0 + 4 * _U64))}
    column_norms = (w * w).sum(dim=0).sqrt()
    bounds["columns"] = _guaranteed(float(column_norms.sum()), m * n)
    row_l1 = w.abs().sum(dim=1)
    bounds["rows"] = _guaranteed(float(row_l1.square().sum().sqrt()), m * n)
    if n <= GRAM_MAX_INPUTS and float(m) * n * n <= GRAM_MAX_WORK:
        gram = w.t() @ w
        rows_squared = bounds["rows"] ** 2
        total = float(gram.abs().sum()) * (1.0 + _gamma64(n * n)) + _gamma64(m) * rows_squared
        bounds["gram"] = _guaranteed(math.sqrt(total), n * n)
    return bounds


def dense_linf_to_l2_estimate(weight: torch.Tensor, spectral_estimate: torch.Tensor) -> torch.Tensor:
    """Differentiable training estimate of the same bound: ``min(√n·σ̂, (b), (c))`` in the weight's dtype
    (``σ̂`` a power-iteration estimate of ``‖W‖₂``; (e) is left out of training to keep steps cheap)."""
    n = weight.shape[1]
    columns = weight.square().sum(dim=0).clamp_min(1e-30).sqrt().sum()
    rows = weight.abs().sum(dim=1).norm()
    return torch.stack([math.sqrt(n) * spectral_estimate.to(weight.dtype), columns, rows]).min()


# --- convolution ------------------------------------------------------------------------------------------------

def _conv_geometry(kernel, input_size, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    nh, nw = _pair(input_size)
    kh, kw = kernel.shape[-2:]
    out = ((nh + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (nw + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    if min(out) < 1:
        raise ValueError(f"convolution has an empty output for input size {(nh, nw)}")
    output_padding = (nh + 2 * ph - dh * (kh - 1) - 1 - (out[0] - 1) * sh,
                      nw + 2 * pw - dw * (kw - 1) - 1 - (out[1] - 1) * sw)
    return (nh, nw), out, (sh, sw), (ph, pw), (dh, dw), output_padding


def _conv_column_squared_norms(kernel_sq, input_size, stride, padding, dilation, groups):
    """``Σ_rows A_{r,k}²`` per input element ``k``: the transposed convolution of an all-ones output with ``K∘K``."""
    (nh, nw), out, s, p, d, op = _conv_geometry(kernel_sq, input_size, stride, padding, dilation)
    ones = torch.ones(1, kernel_sq.shape[0], *out, dtype=kernel_sq.dtype, device=kernel_sq.device)
    return F.conv_transpose2d(ones, kernel_sq, None, s, p, op, groups, d)


def _conv_row_l1(kernel_abs, input_size, stride, padding, dilation, groups):
    """``‖row‖₁`` per output element: the convolution of an all-ones input with ``|K|``."""
    nh, nw = _pair(input_size)
    channels = kernel_abs.shape[1] * groups
    ones = torch.ones(1, channels, nh, nw, dtype=kernel_abs.dtype, device=kernel_abs.device)
    return F.conv2d(ones, kernel_abs, None, _pair(stride), _pair(padding), _pair(dilation), groups)


@torch.no_grad()
def conv2d_matrix(kernel: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """The dense float64 matrix of ``F.conv2d(·, kernel, ...)`` at ``input_size`` (rows: outputs, columns: inputs);
    for tests and small layers."""
    k = kernel.detach().to(torch.float64)
    nh, nw = _pair(input_size)
    n = k.shape[1] * groups * nh * nw
    basis = torch.eye(n, dtype=torch.float64, device=k.device).reshape(n, -1, nh, nw)
    out = F.conv2d(basis, k, None, _pair(stride), _pair(padding), _pair(dilation), groups)
    return out.reshape(n, -1).t()


@torch.no_grad()
def conv2d_linf_to_l2_bounds(kernel: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups=1,
                             spectral_bound: float | None = None) -> dict[str, float]:
    """Guaranteed upper bounds (a), (b), (c) and (for small inputs) (e) on ``‖conv‖∞→2`` at ``input_size``
    (see the module docstring); ``spectral_bound``: a guaranteed ``‖conv‖₂`` if already known."""
    if kernel.ndim != 4:
        raise ValueError(f"conv bound expects a 4-D kernel, got shape {tuple(kernel.shape)}")
    k = _finite_float64(kernel, "kernel")
    (nh, nw), out, s, p, d, _ = _conv_geometry(k, input_size, stride, padding, dilation)
    c_out, c_in_group, kh, kw = k.shape
    n = c_in_group * groups * nh * nw
    rows_count = c_out * out[0] * out[1]
    taps = c_in_group * kh * kw
    if spectral_bound is None:
        spectral_bound = conv2d_spectral_norm_bound(kernel, (nh, nw), s, p, d, groups)
    bounds = {"sqrt_d_spectral": inflate(math.sqrt(n) * float(spectral_bound) * (1.0 + 4 * _U64))}
    column_sq = _conv_column_squared_norms(k * k, (nh, nw), s, p, d, groups)
    bounds["columns"] = _guaranteed(float(column_sq.clamp_min(0).sqrt().sum()), n * c_out * kh * kw)
    row_l1 = _conv_row_l1(k.abs(), (nh, nw), s, p, d, groups)
    bounds["rows"] = _guaranteed(float(row_l1.square().sum().sqrt()), rows_count * taps)
    if n <= GRAM_MAX_INPUTS and float(n) * rows_count * taps <= GRAM_MAX_WORK:
        total = 0.0
        op = _conv_geometry(k, (nh, nw), s, p, d)[-1]
        for start in range(0, n, 256):  # columns of G = convᵀ(conv(e_k)), a chunk of basis images at a time
            count = min(256, n - start)
            basis = torch.zeros(count, n, dtype=torch.float64)
            basis[torch.arange(count), torch.arange(start, start + count)] = 1.0
            images = F.conv2d(basis.reshape(count, -1, nh, nw), k, None, s, p, d, groups)
            columns = F.conv_transpose2d(images, k, None, s, p, op, groups, d)
            total += float(columns.abs().sum())
        total = total * (1.0 + _gamma64(n * n)) + _gamma64(rows_count) * bounds["rows"] ** 2
        bounds["gram"] = _guaranteed(math.sqrt(total), n * n)
    return bounds


def conv2d_linf_to_l2_estimate(kernel: torch.Tensor, input_size, stride, padding, dilation, groups,
                               spectral_estimate: torch.Tensor) -> torch.Tensor:
    """Differentiable training estimate: ``min(√n·σ̂, (b), (c))`` computed with autograd in the kernel's dtype."""
    nh, nw = _pair(input_size)
    n = kernel.shape[1] * groups * nh * nw
    column_sq = _conv_column_squared_norms(kernel.square(), (nh, nw), stride, padding, dilation, groups)
    columns = column_sq.clamp_min(1e-30).sqrt().sum()
    rows = _conv_row_l1(kernel.abs(), (nh, nw), stride, padding, dilation, groups).norm()
    return torch.stack([math.sqrt(n) * spectral_estimate.to(kernel.dtype), columns, rows]).min()


# --- exact norm (tests) -----------------------------------------------------------------------------------------

@torch.no_grad()
def exact_linf_to_l2_norm(matrix: torch.Tensor) -> float:
    """``max_{x ∈ {−1, 1}ⁿ} ‖Ax‖₂`` by enumeration (a convex function's maximum over the cube is at a vertex);
    ``n ≤ 20``. Exact up to float64 rounding; for tests."""
    a = matrix.detach().to(torch.float64)
    n = a.shape[1]
    if n > 20:
        raise ValueError(f"exact ∞→2 norm by enumeration needs n ≤ 20, got {n}")
    best = 0.0
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=min(n, 12))), dtype=torch.float64)
    for rest in itertools.product((-1.0, 1.0), repeat=n - min(n, 12)):
        x = torch.cat([signs, torch.tensor(rest, dtype=torch.float64).expand(len(signs), -1)], dim=1)
        best = max(best, float((x @ a.t()).norm(dim=1).max()))
    return best


# --- prefix constants -------------------------------------------------------------------------------------------

def _infinity_factor(leaf) -> float | None:
    """``‖leaf‖∞→∞`` for the leaves an ∞-distance may pass through before the first affine layer, else ``None``."""
    from .activations import Flatten, MinMax, ReLU
    from .normalization import InputNormalization

    if type(leaf) is InputNormalization:  # diagonal 1/σ: ∞→∞ norm max 1/σ = its L2 bound
        return float(leaf.lipschitz_upper_bound())
    if type(leaf) in (Flatten, MinMax, ReLU):  # coordinate copies / pairwise max-min: 1-Lipschitz in ∞
        return 1.0
    return None


def prefix_constants(leaves: Sequence, lipschitz: Sequence[float], norm: str, input_dim: int | None = None
                     ) -> list[float]:
    """``[P_0, …, P_L]``: guaranteed bounds on ``‖Δz_ℓ‖₂ / ‖Δx‖`` at the input of every leaf and at the output.

    ``norm="l2"``: ``P_0 = 1`` and ``P_{ℓ+1} = P_ℓ·L_ℓ`` multiplied in float64 exactly as the chain's product (the
    L2 numbers are unchanged; the rounding of these products is covered where they are used). ``norm="linf"``: the
    recursion of the module docstring with ``P_0 = √d``, every step rounded up; ``input_dim = d`` is required.
    """
    if norm == "l2":
        prefix, product = [1.0], 1.0
        for bound in lipschitz:
            product *= bound
            prefix.append(product)
        return prefix
    if norm != "linf":
        raise ValueError(f"unknown norm {norm!r}; expected 'l2' or 'linf'")
    if not input_dim or input_dim < 1:
        raise ValueError("norm='linf' needs the input dimension d")
    up = 1.0 + 4 * _U64
    p = math.sqrt(input_dim) * up
    q: float | None = 1.0  # bound on ‖Δz‖∞/‖Δx‖∞ while only ∞-contractive leaves ran
    prefix = [p]
    for leaf, bound in zip(leaves, lipschitz):
        nxt = p * bound * up
        if q is not None:
            factor = _infinity_factor(leaf)
            if factor is not None:
                q = q * factor * up
            else:
                method = getattr(leaf, "linf_to_l2_upper_bound", None)
                if method is not None:
                    nxt = min(nxt, q * float(method()) * up)
                q = None
        p = nxt
        prefix.append(p)
    return prefix


def prefix_estimate(leaves: Sequence, estimates: Sequence[torch.Tensor], norm: str, input_dim: int,
                    linf_estimates: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Differentiable training counterpart of ``prefix_constants(...)[-1]``: ``min(√d·Π est, Q·B̃·Π_{after} est)``
    with ``B̃`` the first affine leaf's differentiable ∞→2 estimate (``linf_estimates[index]``)."""
    total = torch.ones(())
    for e in estimates:
        total = total * e
    if norm == "l2":
        return total
    linf_estimates = linf_estimates or {}
    generic = math.sqrt(input_dim) * total
    q = 1.0
    for index, leaf in enumerate(leaves):
        factor = _infinity_factor(leaf)
        if factor is not None:
            q *= factor
            continue
        if index in linf_estimates:
            rest = torch.ones(())
            for e in estimates[index + 1:]:
                rest = rest * e
            return torch.minimum(generic, q * linf_estimates[index] * rest)
        break
    return generic


def first_linf_leaf(leaves: Sequence) -> int | None:
    """Index of the leaf whose ∞→2 bound :func:`prefix_constants` uses (``None``: the √d fallback applies)."""
    for index, leaf in enumerate(leaves):
        if _infinity_factor(leaf) is not None:
            continue
        return index if hasattr(leaf, "linf_to_l2_upper_bound") else None
    return None
