"""sklearn-maf: Masked Autoregressive Flow density estimation for scikit-learn."""

from ._conditional import MAFConditionalDensity
from ._density import MAFDensity
from ._outlier import MAFOutlierDetector

__version__ = "0.1.0.dev0"

__all__ = ["MAFConditionalDensity", "MAFDensity", "MAFOutlierDetector", "__version__"]
