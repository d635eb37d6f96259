"""Pure-torch building blocks of the flows; nothing here imports scikit-learn."""

from .flow import MAF, AffineMADE, BatchNorm, Standardize, soft_clamp
from .made import MADE, MaskedLinear, hidden_degrees, input_degrees

__all__ = [
    "MADE",
    "MAF",
    "AffineMADE",
    "BatchNorm",
    "MaskedLinear",
    "Standardize",
    "hidden_degrees",
    "input_degrees",
    "soft_clamp",
]
