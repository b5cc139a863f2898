"""The math of hf-gloro: Lipschitz-bounded layers, guaranteed bounds and GloRo margins.

Torch only; nothing here imports ``transformers``.
"""

from .activations import Flatten, MinMax, ReLU, create_activation
from .bounded import (
    ConstantLipschitz,
    LipschitzBounded,
    RoundingModel,
    UnknownLipschitzError,
    check_bounded_forward,
    settings_signature,
)
from .certificate import CertificationResult, ChainConstants, certify_inputs
from .composition import (
    LipschitzSequential,
    chain_leaves,
    converge_power_iterates,
    lipschitz_estimate,
    lipschitz_upper_bound,
    product_upper_bound,
)
from .conv import LipschitzConv2d
from .head import GloRoHead
from .graph import GraphBoundReport, LipschitzGraph, graph_lipschitz_bound, graph_lipschitz_estimate
from .linear import LipschitzLinear
from .linf import (
    conv2d_linf_to_l2_bounds,
    dense_linf_to_l2_bounds,
    exact_linf_to_l2_norm,
    prefix_constants,
)
from .margins import bottom_logit, certify_logits, gloro_logits, pairwise_row_distances
from .normalization import InputNormalization
from .orthogonal import CholeskyOrthogonalLinear, cholesky_orthogonalize, orthogonal_mlp
from .numerics import BOUND_RELATIVE_SLACK, certification_numerics, content_digest, exact_matmul
from .pooling import LipschitzAvgPool2d
from .residual import LinearResidualConv2d, liresnet_residual_scale
from .spectral_bounds import conv2d_spectral_norm_bound, dense_spectral_norm_bound

__all__ = [
    "BOUND_RELATIVE_SLACK",
    "CholeskyOrthogonalLinear",
    "CertificationResult",
    "ChainConstants",
    "ConstantLipschitz",
    "Flatten",
    "GloRoHead",
    "GraphBoundReport",
    "InputNormalization",
    "LinearResidualConv2d",
    "LipschitzAvgPool2d",
    "LipschitzBounded",
    "LipschitzConv2d",
    "LipschitzGraph",
    "LipschitzLinear",
    "LipschitzSequential",
    "MinMax",
    "ReLU",
    "RoundingModel",
    "UnknownLipschitzError",
    "bottom_logit",
    "certification_numerics",
    "certify_inputs",
    "chain_leaves",
    "cholesky_orthogonalize",
    "check_bounded_forward",
    "content_digest",
    "conv2d_linf_to_l2_bounds",
    "dense_linf_to_l2_bounds",
    "exact_linf_to_l2_norm",
    "prefix_constants",
    "certify_logits",
    "conv2d_spectral_norm_bound",
    "converge_power_iterates",
    "create_activation",
    "dense_spectral_norm_bound",
    "exact_matmul",
    "gloro_logits",
    "graph_lipschitz_bound",
    "graph_lipschitz_estimate",
    "liresnet_residual_scale",
    "lipschitz_estimate",
    "lipschitz_upper_bound",
    "orthogonal_mlp",
    "pairwise_row_distances",
    "product_upper_bound",
    "settings_signature",
]
