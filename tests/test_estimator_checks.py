"""scikit-learn's estimator checks, all of them, with no expected failures."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_maf import MAFDensity


def _small():
    # float64 training: sample-weight equivalence and subset invariance are
    # checked to 1e-7, below float32 round-off. A batch larger than any check's
    # data set makes training full-batch, so weighting equals repetition.
    return MAFDensity(
        n_layers=2,
        hidden_units=8,
        max_iter=5,
        batch_size=1000,
        early_stopping=False,
        precision="float64",
        random_state=0,
    )


@parametrize_with_checks([_small()])
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
