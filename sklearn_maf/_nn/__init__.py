"""Pure-torch building blocks of the flows; nothing here imports scikit-learn."""

from .base import EllipticalT, MADEMoG, StandardNormal, StudentT
from .bounds import Bounded
from .flow import MAF, AffineMADE, BatchNorm, Standardize, Whiten, soft_clamp
from .made import MADE, MaskedLinear, hidden_degrees, input_degrees, reused_buffers

__all__ = [
    "MADE",
    "MADEMoG",
    "MAF",
    "AffineMADE",
    "BatchNorm",
    "Bounded",
    "EllipticalT",
    "MaskedLinear",
    "Standardize",
    "StandardNormal",
    "StudentT",
    "Whiten",
    "hidden_degrees",
    "input_degrees",
    "reused_buffers",
    "soft_clamp",
]
