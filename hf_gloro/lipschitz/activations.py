"""1-Lipschitz activations."""

from __future__ import annotations

import torch
from torch import nn

from .bounded import ConstantLipschitz


def _functional_only(tensor: torch.Tensor) -> bool:
    """True where ``out=`` cannot be used: a double backward (``out=`` is not differentiable) or inside a
    functorch transform (vmap/jacrev have no batching rule for ``out=``)."""
    return (torch.is_grad_enabled() and tensor.requires_grad) or torch._C._are_functorch_transforms_active()


class _SortPairs(torch.autograd.Function):
    """``[max(a, b), min(a, b)]`` for the channel halves ``a, b`` of ``x``, with a cheap backward.

    The values are exactly those of ``torch.maximum``/``torch.minimum`` (a comparison and copies), so the
    certificate's "MinMax is exact in floating point" holds. Autograd's own ``maximum``/``minimum`` backward
    spends ~6 elementwise passes per pair (tie masks, ``masked_fill``, zero-filled slices of ``x``'s gradient)
    and keeps both inputs alive; this keeps a boolean mask and routes each gradient to the entry that won. Ties
    split the gradient half and half, exactly as autograd's ``maximum``/``minimum`` do (on MNIST, whole
    background regions tie at initialisation, so the choice changes training and gradient attacks).
    """

    generate_vmap_rule = True  # torch.func.jacrev / vmap work through it

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        if _functional_only(x):
            return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)
        # Written into the two halves of one output (x's memory format): a concatenation of channels-last
        # halves is a slow strided copy on the CPU.
        out = torch.empty_like(x)
        top, bottom = out.chunk(2, dim=1)
        torch.maximum(a, b, out=top)
        torch.minimum(a, b, out=bottom)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        a, b = x.chunk(2, dim=1)
        wins = a > b
        ties = a == b
        ctx.save_for_backward(wins, ties)
        ctx.masks_for_forward = (wins, ties)

    @staticmethod
    def _route(wins: torch.Tensor, ties: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
        top, bottom = incoming.chunk(2, dim=1)
        if _functional_only(incoming):
            to_a, to_b = torch.where(wins, top, bottom), torch.where(wins, bottom, top)
            if bool(ties.any()):
                shared = (top + bottom) * 0.5
                to_a, to_b = torch.where(ties, shared, to_a), torch.where(ties, shared, to_b)
            return torch.cat([to_a, to_b], dim=1)
        # Routing by a 0/½/1 weight per pair instead of `where` (whose CPU kernel is ~2x slower here), written
        # straight into the halves of one tensor: top·m + bottom·(1 − m) is exactly top (m = 1), bottom (m = 0)
        # or (top + bottom)/2 for a tie (halving is exact), as above. (An infinite entry would also turn its
        # partner's gradient into NaN — still non-finite, as a GradScaler expects.)
        weight = wins.to(incoming.dtype)
        if bool(ties.any()):
            weight.add_(ties.to(incoming.dtype), alpha=0.5)
        rest = 1.0 - weight
        routed = torch.empty_like(incoming)
        to_a, to_b = routed.chunk(2, dim=1)
        torch.mul(top, weight, out=to_a).addcmul_(bottom, rest)
        torch.mul(bottom, weight, out=to_b).addcmul_(top, rest)
        return routed

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        wins, ties = ctx.saved_tensors
        return _SortPairs._route(wins, ties, grad)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return _SortPairs._route(*ctx.masks_for_forward, tangent)


class MinMax(ConstantLipschitz, nn.Module):
    """GroupSort-2 ("MinMax"): pairs channel ``c`` with ``c + C/2`` and outputs ``[max, min]``.

    Sorting each pair is a permutation of its two entries, so the map is 1-Lipschitz in L2 and preserves
    gradient norms. Works on ``(B, C)`` and ``(B, C, H, W)``; ``C`` must be even.
    """

    lipschitz_constant = 1.0
    exact_in_floating_point = True  # max/min/cat copy values; the norm is preserved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels % 2:
            raise ValueError(f"MinMax needs an even number of channels, got {channels}")
        if torch.is_grad_enabled() and x.requires_grad:
            return _SortPairs.apply(x)
        a, b = x[:, : channels // 2], x[:, channels // 2 :]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    _bounded_forward = forward


class ReLU(ConstantLipschitz, nn.ReLU):
    """``nn.ReLU`` with its Lipschitz constant 1 declared."""

    lipschitz_constant = 1.0
    exact_in_floating_point = True  # max(x, 0) is exact and never increases the norm
    _bounded_forward = nn.ReLU.forward


class Flatten(ConstantLipschitz, nn.Flatten):
    """``nn.Flatten``: a reshape, an isometry."""

    lipschitz_constant = 1.0
    exact_in_floating_point = True
    _bounded_forward = nn.Flatten.forward


def create_activation(name: str) -> nn.Module:
    """Activation by name: ``"minmax"`` or ``"relu"``."""
    if name == "minmax":
        return MinMax()
    if name == "relu":
        return ReLU()
    raise ValueError(f"unknown activation {name!r}; expected 'minmax' or 'relu'")
