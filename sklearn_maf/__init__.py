"""sklearn-maf: Masked Autoregressive Flow density estimation for scikit-learn."""

from ._conditional import MAFConditionalDensity
from ._density import MAFDensity

__version__ = "0.1.0.dev0"

__all__ = ["MAFConditionalDensity", "MAFDensity", "__version__"]
