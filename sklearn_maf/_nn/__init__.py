"""Pure-torch building blocks of the flows; nothing here imports scikit-learn.

``preprocessing``: the fixed float64 first layers; ``transforms``: the learned
layers; ``distributions``: the base distributions; ``made``: the masked
network that parametrises an autoregressive layer; ``flow``: their
composition and registration; ``backprop``: the training step's loss and
gradient as a loop over the layers; ``_native``: the checked door into the
optional C module.
"""

from .distributions import EllipticalT, MADEMoG, StandardNormal, StudentT
from .flow import BASES, MAF, TRANSFORMS
from .made import MADE, MaskedLinear, hidden_degrees, input_degrees, reused_buffers
from .preprocessing import Bounded, Standardize, Whiten
from .transforms import AffineMADE, BatchNorm, soft_clamp

__all__ = [
    "BASES",
    "MADE",
    "MADEMoG",
    "MAF",
    "TRANSFORMS",
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
