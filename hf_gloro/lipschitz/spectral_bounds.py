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

    the block row stacking the ``s²`` aliased frequencies (the space-to-depth view of a strided
    convolution). A shift of the input (the padding offset) is a unitary on the right and does not change
    the norm.

    **Polyphase form.** Write each (dilated) tap position as ``t = s·q + r`` with ``r ∈ [0, s)²``. Then
    ``K̂(ν + aM) = Σ_r e^{−2πi⟨a,r⟩/s} e^{−2πi⟨ν,r⟩/N} Ŝ_r(ν)`` with ``Ŝ_r(ν) = Σ_q K_{sq+r} e^{−2πi⟨ν,q⟩/M}``;
    the matrix ``e^{−2πi⟨a,r⟩/s}/s`` is unitary and the phases ``e^{−2πi⟨ν,r⟩/N}`` are a diagonal unitary, so

        ‖C‖ = max_ν σ_max(Â(ν)),   Â(ν) = Σ_q A_q e^{−2πi⟨ν,q⟩/M},   A_q = [K_{sq+r}]_r  (C_out × s²·C_in),

    a *stride-1* problem on the ``M × M`` torus with the few polyphase taps ``A_q`` (9 for a 3×3 stride-1
    kernel, 1 for a non-overlapping 4×4 stride-4 kernel).

    **Tap-offset Gram matrices.** ``G(ν) = Â(ν)Â(ν)ᴴ = Σ_d P_d e^{−2πi⟨ν,d⟩/M}`` with the real matrices
    ``P_d = Σ_{q−q'=d} A_q A_q'ᵀ`` (25 offsets for a 3×3 kernel) and ``P_{−d} = P_dᵀ``, so with ``φ_d(ν) =
    2π⟨ν,d⟩/M`` and ``d`` over a half plane ``H``,

        G(ν) = P_0 + Σ_{d∈H} [ (P_d + P_dᵀ)·cos φ_d(ν) − i·(P_d − P_dᵀ)·sin φ_d(ν) ].

    The ``P_d`` are computed once per layer as real matrix products; each ``G(ν)`` is then a short linear
    combination (one small GEMM for a batch of frequencies) instead of a complex ``n³`` product. The smaller
    side is used (``ÂÂᴴ`` or, with ``A_qᵀ`` in place of ``A_q``, ``ÂᴴÂ`` at ``−ν``: same spectrum). A real kernel
    gives ``G(−ν) = conj(G(ν))``, so half of the frequencies suffice; with a single tap ``G`` is constant.

    **Verify rather than solve** (:func:`_verified_max_eigenvalue`). Every frequency is *verified* below a
    threshold ``T`` by a float64 Cholesky factorisation of ``T·I − G(ν)`` (several times cheaper than an
    eigen-solve); the certificate rests on these factorisations only. Choosing ``T``: two power iterations per
    frequency *rank* the frequencies, a Lanczos estimate of the top-ranked one's eigenvalue gives
    ``T₀ = λ·(1 + 10⁻⁴)``, and the frequencies are verified in ranked order in growing batches; a batch's
    failures (only those) are searched by raising the threshold geometrically and bisecting it back to within
    ``1 + 10⁻⁴`` of a level they fail, and the later batches use the raised threshold. So the result is at most
    ``(1 + 10⁻⁴)·max_ν λ_max(G(ν))`` (``5·10⁻⁵`` in the norm) plus rounding terms. Gram matrices up to 64×64
    are simply eigen-solved at every frequency, then verified; a large constant symbol (one polyphase tap) gets
    its threshold from Lanczos instead of an eigen-solve.

Error model of the convolution bound (``u = 2⁻⁵³``, ``γ_k = k·u/(1 − k·u)``; every term is added explicitly)
    1. *Formation of G.* Every entry of ``G(ν)`` is a sum over tap pairs of products of kernel entries times
       a phase. ``P_d``: dot products of length ``≤ m`` (any summation order, FMA or not; Higham Lemma 3.1):
       ``|ΔP_d| ≤ γ_m Σ|A_q||A_q'|ᵀ``. ``P_d ± P_dᵀ``: one rounding (``u``). The phase ``φ = 2π·k/(M_h M_w)``
       has an exact integer ``k`` reduced modulo ``M_h M_w``; its two roundings and those of ``cos``/``sin``
       (libm/SLEEF, ≤ 4 ulp) give an absolute error ``≤ 32u`` in each coefficient. The combination is a sum
       of at most ``2|H| + 1`` terms (``γ_{2|H|+1}``; the real part has ``1 + |H|`` nonzero terms, the imaginary
       part ``|H|``; one GEMM forms both, the other slots multiplying exact zeros, which add nothing). Real and
       imaginary parts each err by at most ``c·u·W`` with ``c = m + 2|H| + 41`` (first order; doubled for the
       higher-order terms) and ``W = Σ_{q,q'}|A_q||A_q'|ᵀ = ĀĀᵀ``, ``Ā = Σ_q |A_q|``, hence
       ``‖Ĝ − G‖₂ ≤ ‖|ΔG|‖₂ ≤ ε_form := 4c·u·‖Ā‖_F²·(1 + 10⁻⁶)``, the last factor covering the float64
       evaluation of ``‖Ā‖_F²`` (``≤ γ_{n·n'}`` relative).
    2. *Verification.* ``Ã = fl(T·I − Ĝ)`` differs from ``T·I − Ĝ`` only on the diagonal, by ``≤ u·Ã_ii``.
       LAPACK factors the Hermitian matrix given by ``Ã``'s lower triangle (``Ĝ``'s diagonal is real: the
       imaginary part is ``−Σ (P_d − P_dᵀ)_ii sin φ = 0`` exactly). If the Cholesky factorisation succeeds,
       ``R̃ᴴR̃ = Ã + ΔA`` with ``|ΔA| ≤ γ̃|R̃ᴴ||R̃|`` (Higham, *Accuracy and Stability*, Thm 10.5), where we use the
       generous ``γ̃ = γ_{16(n+1)}`` for complex arithmetic. So ``‖ΔA‖₂ ≤ γ̃‖R̃‖_F²`` and, since ``‖R̃‖_F² =
       tr(Ã + ΔA) ≤ tr(Ã)/(1 − γ̃)`` and ``0 < Ã_ii ≤ (1+u)(T + ε_form)`` (``G``'s exact diagonal is ``≥ 0``),

           λ_max(Ĝ) ≤ T + u(1+u)(T + ε_form) + γ̃/(1 − γ̃)·(1+u)·n·(T + ε_form)
                    ≤ (T + ε_form)·(1 + 2u + 2γ̃·n),   λ_max(G) ≤ that + ε_form.

       This a-priori form depends only on ``T`` (not on which frequency was verified when), so the result
       does not depend on the path taken or the thread count beyond the last bits of ``T``.
    3. ``fl(sqrt(x)) ≥ sqrt(x)(1 − u)``: the square root is multiplied by ``1 + 2u``. The kernel is first
       multiplied by ``2^−e`` (exact) so that its largest entry is in ``[1, 2)``, and the result by ``2^e``
       (exact): no intermediate overflows, and underflow (≤ ``2^−1021`` absolute per operation, with or
       without flush-to-zero) is covered by an absolute term in ``ε_form``.
    4. Finally ``inflate`` multiplies by ``1 + BOUND_RELATIVE_SLACK`` and rounds *up* to 9 significant
       digits (reproducibility across thread counts). For a 512-channel 3×3 layer the terms above total
       ``≈ 1e-9`` relative, three orders of magnitude below that slack.
"""

from __future__ import annotations

import math

import torch

from .numerics import inflate

_UNIT = 2.0**-53

#: Relative margin of a verification threshold above an eigenvalue found by an eigen-solve (rounding only).
_THRESHOLD_MARGIN = 1e-7

#: Relative margin of the first threshold above the eigenvalue at the estimated top frequency: frequencies
#: within it pass the first round of factorisations. The bound loses at most this (in λ; half in σ).
_FIRST_MARGIN = 1e-4

#: Up to this Gram size every frequency is eigen-solved (cheap), so the threshold is tight.
_SOLVE_ALL_UP_TO = 64

#: Lanczos steps that choose the first threshold of a large Gram matrix (never part of the bound).
_LANCZOS_STEPS = 64

#: First relative step of a threshold raise (then ×4 per round until the failing frequencies pass).
_RAISE_STEP = 2e-4

#: Raise/bisection rounds before the remaining frequencies are eigen-solved (a fallback, never reached here).
_SEARCH_ROUNDS = 60

#: Size of the first verification batch (then doubled up to ``_FREQUENCY_CHUNK``).
_FIRST_BATCH = 4

#: Frequencies formed and factorised per batch (memory ≈ batch · n² · 16 bytes: one workspace, factorised in place).
_FREQUENCY_CHUNK = 32

#: Power iterations per frequency used only to *choose* the threshold (never part of the bound).
_ESTIMATE_ITERATIONS = 2


def _gamma(k: float) -> float:
    """Higham's ``γ_k = k·u/(1 − k·u)`` for float64."""
    ku = k * _UNIT
    if ku >= 0.01:
        raise ValueError(f"rounding-error constant out of range (k = {k})")
    return ku / (1.0 - ku)


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


def _polyphase_taps(
    kernel: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Positions ``q`` and matrices ``A_q = [K_{s·q+r}]_r`` (``C_out × s_h·s_w·C_in``) of the equivalent
    stride-1 kernel on the ``M``-torus (see the module docstring)."""
    c_out, c_in, kh, kw = kernel.shape
    (sh, sw), (dh, dw) = stride, dilation
    positions: list[tuple[int, int]] = []
    index: dict[tuple[int, int], int] = {}
    slots = []
    for i in range(kh):
        for j in range(kw):
            th, tw = i * dh, j * dw
            q = (th // sh, tw // sw)
            if q not in index:
                index[q] = len(positions)
                positions.append(q)
            slots.append((index[q], (th % sh) * sw + tw % sw, i, j))
    taps = kernel.new_zeros(len(positions), c_out, sh * sw * c_in)
    for tap, phase, i, j in slots:
        taps[tap, :, phase * c_in : (phase + 1) * c_in] = kernel[:, :, i, j]
    return positions, taps


class _SymbolGram:
    """``G(ν) = Σ_d P_d e^{−2πi⟨ν,d⟩/M}`` for one group, from the tap-offset products (module docstring)."""

    def __init__(self, taps: torch.Tensor, positions: list[tuple[int, int]], torus: tuple[int, int]) -> None:
        if taps.shape[1] > taps.shape[2]:  # the smaller Gram side: ÂᴴÂ (at −ν) via the transposed taps
            taps = taps.transpose(1, 2)
        self.n = n = taps.shape[1]
        self.torus = torus
        pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for a, qa in enumerate(positions):
            for b, qb in enumerate(positions):
                d = (qa[0] - qb[0], qa[1] - qb[1])
                if d == (0, 0) or d[0] > 0 or (d[0] == 0 and d[1] > 0):
                    pairs.setdefault(d, []).append((a, b))
        zero = pairs.pop((0, 0))
        self.offsets = sorted(pairs)
        inner = [len(zero)] + [len(pairs[d]) for d in self.offsets]
        self.inner_length = max(inner) * taps.shape[2]  # m: the longest dot product in any P_d

        def product(pair_list: list[tuple[int, int]]) -> torch.Tensor:
            left = torch.cat([taps[a] for a, _ in pair_list], dim=1)
            right = torch.cat([taps[b] for _, b in pair_list], dim=1)
            return left @ right.T

        # One real GEMM forms a batch of G(ν) directly in complex128's memory layout (real and imaginary parts
        # interleaved): the basis rows [P_0, P_d + P_dᵀ for d ∈ H] (cosine coefficients) fill the real slots,
        # the rows [P_d − P_dᵀ] (minus-sine coefficients) the imaginary ones, and the other slot of each row
        # holds exact zeros. A product with an exact zero adds exactly nothing, so each computed entry is still
        # a sum of 2|H| + 1 terms (the error model's γ_{2|H|+1}), and no interleaving copy is needed.
        rows = 1 + 2 * len(self.offsets)
        if self.offsets:
            self.basis = taps.new_zeros(rows, n * n, 2)
            self.basis[0, :, 0] = product(zero).reshape(n * n)
            for row, d in enumerate(self.offsets):
                p = product(pairs[d])
                self.basis[row + 1, :, 0] = (p + p.T).reshape(n * n)
                self.basis[1 + len(self.offsets) + row, :, 1] = (p - p.T).reshape(n * n)
            self.basis = self.basis.reshape(rows, 2 * n * n)
        else:  # a constant symbol: G = P_0, real
            self.basis = product(zero).reshape(1, n * n)
        # Every entry of every P_d is a sum of ≤ m products of tap entries, so |entry| ≤ m·max|A|²: finiteness of
        # the taps and that a-priori size rule out overflow without scanning the (large) basis.
        largest = float(taps.abs().max())
        if not math.isfinite(largest) or 2.0 * self.inner_length * largest * largest > 2.0**900:
            raise ValueError("kernel too large for a float64 bound")  # unreachable after the 2^e scaling
        magnitude = taps.abs().sum(dim=0)  # Ā = Σ_q |A_q|
        abar_fro2 = float((magnitude * magnitude).sum())
        c = self.inner_length + 2 * len(self.offsets) + 41
        # ε_form, plus an absolute 2^-1021 per operation for underflow (n·m·c operations per entry, far more
        # than enough; the kernel is scaled to entries in [1, 2) first, so this term is negligible).
        self.formation_error = 4.0 * c * _UNIT * abar_fro2 * (1.0 + 1e-6) + n * n * c * self.inner_length * 2.0**-1021
        # Every λ_max(G(ν)) ≥ max_i Σ_q ‖row_i(A_q)‖² (the frequency average of G_ii) ≥ ‖Ā‖_F²/(n·Q):
        # a scale for the threshold's absolute floor that never exceeds the answer.
        self.scale = abar_fro2 / (n * len(positions))

    def frequencies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Half of ``Z_{M_h} × Z_{M_w}`` (one of each pair ``ν, −ν``); a single frequency if ``G`` is constant."""
        m_h, m_w = self.torus
        if not self.offsets:
            return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        nu_h = torch.arange(m_h).repeat_interleave(m_w)
        nu_w = torch.arange(m_w).repeat(m_h)
        keep = nu_h * m_w + nu_w <= ((-nu_h) % m_h) * m_w + (-nu_w) % m_w
        return nu_h[keep], nu_w[keep]

    def form(
        self, nu_h: torch.Tensor, nu_w: torch.Tensor, out: torch.Tensor | None = None, negate: bool = False
    ) -> torch.Tensor:
        """Computed ``Ĝ(ν)`` (``−Ĝ(ν)`` with ``negate``; the negation is exact) for a batch of frequencies:
        ``(F, n, n)`` complex128 (float64 if constant), written into ``out`` when given (a reused workspace:
        fresh allocations of this size cost more in page faults than the GEMM itself)."""
        n, count = self.n, len(nu_h)
        if out is None:
            out = torch.empty(count, n, n, dtype=self.dtype, device=self.basis.device)
        if not out.is_contiguous():  # the GEMM below writes through a view; a copy would be silently lost
            raise ValueError("form() needs a contiguous output buffer")
        if not self.offsets:
            out.copy_(self.basis.reshape(1, n, n).expand(count, n, n))
            return out.neg_() if negate else out
        m_h, m_w = self.torus
        d_h = torch.tensor([d[0] for d in self.offsets], dtype=torch.long)
        d_w = torch.tensor([d[1] for d in self.offsets], dtype=torch.long)
        # φ = 2π·k/(M_h·M_w), k an exact integer reduced modulo M_h·M_w.
        k = (nu_h[:, None] * d_h[None] * m_w + nu_w[:, None] * d_w[None] * m_h) % (m_h * m_w)
        angle = (2 * math.pi / (m_h * m_w)) * k.double()
        coefficients = torch.cat([torch.ones(count, 1, dtype=torch.float64), angle.cos(), -angle.sin()], dim=1)
        if negate:
            coefficients.neg_()
        torch.mm(coefficients.to(self.basis.device), self.basis, out=torch.view_as_real(out).reshape(count, 2 * n * n))
        return out

    @property
    def dtype(self) -> torch.dtype:
        return torch.complex128 if self.offsets else torch.float64


def _power_estimates(grams: torch.Tensor, iterations: int) -> torch.Tensor:
    """Rayleigh quotients after a few power iterations from a fixed start (only used to choose ``T``)."""
    n = grams.shape[-1]
    start = 1.0 + 0.5 * torch.cos(torch.arange(n, dtype=torch.float64) * 0.7548776662466927)
    vector = start.to(grams).reshape(1, n, 1).expand(grams.shape[0], n, 1)
    for _ in range(iterations):
        vector = grams @ vector
        vector = vector / vector.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (vector.mH @ grams @ vector).real.reshape(-1)


def _cholesky_fails(negated_grams: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the matrices for which ``T·I − Ĝ`` is *not* verified positive definite, given ``−Ĝ``
    (overwritten: the factorisation runs in place)."""
    matrices = negated_grams
    matrices.diagonal(dim1=-2, dim2=-1).add_(threshold)
    # The input is finite (checked on the basis, see _SymbolGram), so LAPACK's success (info = 0: every
    # pivot positive, none NaN) is the hypothesis of Higham's Thm 10.5. The factorisation runs in place on
    # the transposed view (column-major for LAPACK: no copy, no fresh allocation); that view is the
    # transpose (= the conjugate, for a Hermitian matrix) of the same matrix, with the same eigenvalues, and
    # whichever triangle LAPACK reads defines a Hermitian matrix within ε_form of G entrywise.
    info = torch.empty(matrices.shape[0], dtype=torch.int32, device=matrices.device)
    torch.linalg.cholesky_ex(matrices.mT, out=(matrices.mT, info))
    return (info != 0).nonzero().reshape(-1).cpu()  # the frequency index tensors live on the CPU


#: Work done by the last :func:`conv2d_spectral_norm_bound` call (for benchmarks and tests).
last_call_stats: dict[str, int] = {}


def _count(key: str, value: int) -> None:
    last_call_stats[key] = last_call_stats.get(key, 0) + int(value)


def _lanczos_top(matrix: torch.Tensor, steps: int) -> float:
    """Largest Ritz value of ``steps`` Lanczos steps (full reorthogonalisation) on one Hermitian matrix.

    A lower estimate of ``λ_max`` (every Ritz value lies in the spectrum's hull), usually exact to ~1e-8 here;
    it only chooses a threshold and is never part of a bound. About ``steps`` matrix-vector products instead
    of a full eigen-solve (5-10× cheaper for a 512×512 complex matrix).
    """
    n = matrix.shape[-1]
    steps = max(1, min(int(steps), n))
    start = 1.0 + 0.5 * torch.cos(torch.arange(n, dtype=torch.float64) * 0.7548776662466927)
    q = (start / start.norm()).to(matrix)
    basis = matrix.new_zeros(steps, n)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        basis[j] = q
        w = matrix @ q
        alphas.append(float(torch.vdot(q, w).real))
        done = basis[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - done.mT @ (done.conj() @ w)
        beta = float(w.norm())
        if j == steps - 1 or not math.isfinite(beta) or beta <= 1e-13 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        q = w / beta
    size = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if size > 1:
        off = torch.tensor(betas[: size - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(tridiagonal)[-1])


def _batches(length: int) -> list[slice]:
    return [slice(s, s + _FREQUENCY_CHUNK) for s in range(0, length, _FREQUENCY_CHUNK)]


def _verified_max_eigenvalue(symbol: _SymbolGram) -> float:
    """Guaranteed upper bound on ``max_ν λ_max(G(ν))`` (error model in the module docstring).

    Only Cholesky successes enter the result: the returned value is derived from the largest threshold
    ``T`` at which some frequency was verified, and every frequency is verified at some threshold. The rest
    is a search for a small such ``T``:

    * small Gram matrices (``n ≤ 64``): every frequency is eigen-solved and verified just above the maximum;
    * otherwise cheap power-iteration estimates *rank* the frequencies, a Lanczos estimate of the top-ranked
      one's eigenvalue gives the first threshold ``T₀ = λ·(1 + 10⁻⁴)``, and the frequencies are verified in
      ranked order, in growing batches (4, 8, 16, 32, 32, …). Whenever some fail the current threshold, only
      those are searched — the threshold is raised geometrically until they pass, then bisected down to within
      ``1 + 10⁻⁴`` of a level they fail — and the later batches are verified at the new threshold. With a
      good ranking the first batch contains the maximum and nothing else fails; with a useless one (the
      nearly flat symbol of a LiResNet block at initialisation) only running maxima ("records") fail, a few
      per layer instead of a third of all frequencies against one threshold chosen up front.

    The result is at most ``(1 + 10⁻⁴)·max_ν λ_max`` plus the rounding terms: every threshold raise ends at
    most ``1 + 10⁻⁴`` above a level that some frequency failed.
    """
    nu_h, nu_w = symbol.frequencies()
    count, n = len(nu_h), symbol.n
    _count("frequencies", count)
    floor = _THRESHOLD_MARGIN * symbol.scale + 1e-300
    # One workspace for every batch of this layer: forming a batch again costs less than keeping all of them
    # (a fresh allocation of this size is dominated by its page faults).
    workspace = torch.empty(min(count, _FREQUENCY_CHUNK), n, n, dtype=symbol.dtype, device=symbol.basis.device)

    def formed(indices: torch.Tensor, negate: bool = False) -> torch.Tensor:
        return symbol.form(nu_h[indices], nu_w[indices], out=workspace[: len(indices)], negate=negate)

    chunks = _batches(count)
    everything = torch.arange(count)
    if count == 1 or n <= _SOLVE_ALL_UP_TO:
        if count == 1 and n > _SOLVE_ALL_UP_TO:  # a large constant symbol: Lanczos instead of an eigen-solve
            solved = _lanczos_top(formed(everything)[0], _LANCZOS_STEPS)
            _count("lanczos", 1)
        else:  # cheap enough to solve every frequency: the threshold sits just above the exact maximum
            solved = max(float(torch.linalg.eigvalsh(formed(everything[rows]))[..., -1].max()) for rows in chunks)
            _count("eigen_solves", count)
        order, first_batch = everything, _FREQUENCY_CHUNK
        level = max(solved, 0.0) * (1.0 + _THRESHOLD_MARGIN) + floor
    else:
        estimates = torch.cat([_power_estimates(formed(everything[rows]), _ESTIMATE_ITERATIONS).cpu()
                               for rows in chunks])
        # Rank on estimates rounded to 7 digits (stable sort: ties by index), so that the order, and with it
        # the thresholds tried, does not depend on the last bits that thread counts change.
        scale = float(estimates.abs().max()) or 1.0
        quantised = torch.round(estimates / scale * 1e7)
        order = torch.sort(quantised, descending=True, stable=True).indices
        solved = _lanczos_top(formed(order[:1])[0], _LANCZOS_STEPS)
        _count("lanczos", 1)
        level, first_batch = max(solved, 0.0) * (1.0 + _FIRST_MARGIN) + floor, _FIRST_BATCH

    verified_at = -math.inf  # the largest threshold at which some frequency was verified so far

    def verify(pending: torch.Tensor, at: float, final: bool = True) -> torch.Tensor:
        """The frequencies of ``pending`` (indices) that are *not* verified below ``at``. With ``final``, the
        ones that are count as verified at ``at`` (they are not tried again)."""
        nonlocal verified_at
        _count("factorisations", len(pending))
        failing = torch.cat([
            pending[rows][_cholesky_fails(formed(pending[rows], negate=True), at)]
            for rows in _batches(len(pending))
        ])
        if final and len(failing) < len(pending):
            verified_at = max(verified_at, at)
        return failing

    def search(pending: torch.Tensor, low: float) -> float:
        """Verify ``pending`` (which all failed ``low``); returns the level at which the last of them passed.

        ``low`` is always a level every pending frequency fails (so its λ_max exceeds ``low`` up to rounding),
        ``high`` one they all passed. When all pass a trial level, that level is only an upper candidate (they
        are tried again lower); when some pass, those are verified there for good."""
        nonlocal verified_at
        high, step = math.inf, _RAISE_STEP
        for _ in range(_SEARCH_ROUNDS):
            if high <= low * (1.0 + _FIRST_MARGIN):
                verified_at = max(verified_at, high)  # every pending frequency passed ``high``
                return high
            at = low * (1.0 + step) if math.isinf(high) else math.sqrt(low * high)
            still = verify(pending, at, final=False)
            if len(still) == 0:
                high = at
            else:
                if len(still) < len(pending):
                    verified_at = max(verified_at, at)
                low, pending = at, still
                if math.isinf(high):
                    step *= 4.0
        if math.isfinite(high):  # out of rounds (pathological): everything pending passed ``high``
            verified_at = max(verified_at, high)
            return high
        # Never passed (pathological): eigen-solve what is left and verify just above it, with growing margins.
        margin = _THRESHOLD_MARGIN
        for _ in range(8):
            solved = max(float(torch.linalg.eigvalsh(formed(pending[rows]))[..., -1].max())
                         for rows in _batches(len(pending)))
            _count("eigen_solves", len(pending))
            at = max(solved, 0.0) * (1.0 + margin) + floor
            pending = verify(pending, at)
            if len(pending) == 0:
                return at
            margin *= 10.0
        raise ArithmeticError("could not verify a spectral-norm threshold (ill-conditioned kernel?)")

    # Verify in ranked order, in growing batches; a batch's failures raise the threshold for the rest.
    start, size = 0, first_batch
    while start < count:
        batch = order[start:start + size]
        failed = verify(batch, level)
        _count("first_failures", len(failed))
        if len(failed):
            level = max(level, search(failed, level))
        start += len(batch)
        size = min(2 * size, _FREQUENCY_CHUNK)
    return _certified(symbol, verified_at)


def _certified(symbol: _SymbolGram, threshold: float) -> float:
    """Step 2 of the error model: from a verified threshold ``T`` to a bound on ``max_ν λ_max(G(ν))``."""
    gamma = _gamma(16 * (symbol.n + 1))
    eps = symbol.formation_error
    return (threshold + eps) * (1.0 + 2 * _UNIT + 2 * gamma * symbol.n) + eps


@torch.no_grad()
def conv2d_spectral_norm_bound(
    kernel: torch.Tensor,
    input_size: tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> float:
    """Guaranteed upper bound on the L2 operator norm of ``F.conv2d(·, kernel, stride, padding, ...)``.

    Args:
        kernel: ``(C_out, C_in / groups, k_h, k_w)``.
        input_size: ``(n_h, n_w)`` of the input the layer is applied to.

    Returns:
        ``(1 + slack) · max_ν σ_max(Â(ν))`` plus the rounding terms of the module docstring, rounded up.
    """
    if kernel.ndim != 4:
        raise ValueError(f"conv bound expects a 4-D kernel, got shape {tuple(kernel.shape)}")
    k = _as_float64(kernel)
    if not torch.isfinite(k).all():
        raise ValueError("kernel contains NaN or inf; refusing to compute a Lipschitz bound")
    c_out, _, kh, kw = k.shape
    if c_out % groups:
        raise ValueError(f"out_channels {c_out} not divisible by groups {groups}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    nh, nw = input_size
    big_h = circular_embedding_size(nh, kh, sh, ph, dh)
    big_w = circular_embedding_size(nw, kw, sw, pw, dw)
    torus = (big_h // sh, big_w // sw)
    # Scale by a power of two (exact) so that the largest entry lies in [1, 2): nothing can overflow and
    # underflow is confined to entries far below the result. The norm scales back exactly.
    largest = float(k.abs().max())
    if largest == 0.0:
        return 0.0
    exponent = math.frexp(largest)[1] - 1
    half = -exponent // 2
    k = k * 2.0**half * 2.0 ** (-exponent - half)  # two exact power-of-two factors (no 2^±1074 overflow)
    out_per_group = c_out // groups
    last_call_stats.clear()
    best = 0.0
    for g in range(groups):
        group = k[g * out_per_group : (g + 1) * out_per_group]
        if not group.any():
            continue  # a zero group has norm 0 exactly
        positions, taps = _polyphase_taps(group, (sh, sw), (dh, dw))
        best = max(best, _verified_max_eigenvalue(_SymbolGram(taps, positions, torus)))
    # Entries that underflowed in the scaling moved by ≤ 2^-1074 each: ≤ numel·2^-1074 in operator norm.
    sigma = math.sqrt(best) * (1.0 + 2 * _UNIT) + k.numel() * 2.0**-1074
    return inflate(math.ldexp(sigma, exponent))
