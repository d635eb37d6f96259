"""sklearn-maf: Masked Autoregressive Flow density estimation for scikit-learn."""

# before the estimators, whose pickles record it
__version__ = "0.1.0.dev0"

from ._conditional import MAFConditionalDensity  # noqa: E402
from ._density import MAFDensity  # noqa: E402
from ._outlier import MAFOutlierDetector  # noqa: E402

__all__ = ["MAFConditionalDensity", "MAFDensity", "MAFOutlierDetector", "__version__"]
