"""scikit-learn's estimator checks, all of them, with no expected failures."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_maf import MAFDensity, MAFOutlierDetector

# float64 training: sample-weight equivalence and subset invariance are
# checked to 1e-7, below float32 round-off. A batch larger than any check's
# data set makes training full-batch, so weighting equals repetition.
_SMALL = dict(
    n_layers=2,
    hidden_units=8,
    max_iter=5,
    batch_size=1000,
    early_stopping=False,
    precision="float64",
    random_state=0,
)


@parametrize_with_checks(
    [
        MAFDensity(**_SMALL),
        # Dequantization noise is drawn per row, so a weight of 2 cannot equal
        # two rows with their own noise: the checks run without it.
        MAFOutlierDetector(dequantize=False, **_SMALL),
    ]
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
