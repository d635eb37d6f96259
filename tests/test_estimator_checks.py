"""scikit-learn's estimator checks, all of them, with no expected failures."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_maf import MAFConditionalDensity, MAFDensity, MAFOutlierDetector


def _small(estimator=MAFDensity, **params):
    # float64 training: sample-weight equivalence and subset invariance are
    # checked to 1e-7, below float32 round-off. A batch larger than any check's
    # data set makes training full-batch, so weighting equals repetition.
    return estimator(
        n_layers=2,
        hidden_units=8,
        max_iter=5,
        batch_size=1000,
        early_stopping=False,
        precision="float64",
        random_state=0,
        **params,
    )


def _not_applicable(estimator):
    """Checks that call ``score_samples(X)``: a conditional density needs ``y`` too.

    tests/test_conditional.py checks the same two properties (subset and
    sample-order invariance) for ``score_samples(X, y)``. MAFDensity has none.
    """
    if not isinstance(estimator, MAFConditionalDensity):
        return {}
    reason = "score_samples(X, y) of a conditional density needs y"
    return {
        "check_methods_subset_invariance": reason,
        "check_methods_sample_order_invariance": reason,
    }


@parametrize_with_checks(
    [
        _small(MAFDensity),
        # the bases' checks with the broad Gaussian alone as the reference: the
        # default's BIC search and k-means run in the first estimator's checks
        _small(MAFDensity, base="mog", n_components=3, reference="gaussian"),
        _small(MAFDensity, base="student-t", reference="gaussian"),
        _small(MAFDensity, base="elliptical-t", reference="gaussian"),
        _small(MAFDensity, base="fitted-t", reference="gaussian"),
        _small(MAFConditionalDensity),
        # Dequantization noise is drawn per row, so a weight of 2 cannot equal
        # two rows with their own noise: the detector's checks run without it.
        _small(MAFOutlierDetector, dequantize=False),
    ],
    expected_failed_checks=_not_applicable,
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
