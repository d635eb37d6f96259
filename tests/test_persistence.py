"""Tests for sklearn_maf._persistence: the version is recorded, another version warns, a missing piece raises."""

import pickle
import sys
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import sklearn_maf
import sklearn_maf._persistence
from sklearn_maf import MAFConditionalDensity, MAFDensity, MAFOutlierDetector
from sklearn_maf.exceptions import IncompatiblePickleError, InconsistentVersionWarning

SMALL = dict(n_layers=2, hidden_units=8, max_iter=2, random_state=0)


def _fit(estimator):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(120, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if isinstance(estimator, MAFConditionalDensity):
            return estimator.fit(X[:, :1], X[:, 1]), (X[:, :1], X[:, 1])
        return estimator.fit(X), (X,)


@pytest.fixture(
    scope="module",
    params=[MAFDensity, MAFOutlierDetector, MAFConditionalDensity],
    ids=["density", "outlier", "conditional"],
)
def fitted(request):
    return _fit(request.param(**SMALL))


def test_same_version_loads_without_a_warning(fitted):
    model, data = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error", InconsistentVersionWarning)
        loaded = pickle.loads(pickle.dumps(model))
    assert "_sklearn_maf_version" not in loaded.__dict__
    np.testing.assert_array_equal(loaded.score_samples(*data), model.score_samples(*data))


def test_another_version_warns_with_both_versions(fitted, monkeypatch):
    """The pickle records the version that made it; loading it with another warns, as scikit-learn does."""
    model, data = fitted
    with monkeypatch.context() as patch:
        patch.setattr(sklearn_maf._persistence, "__version__", "0.0.1")
        payload = pickle.dumps(model)
    message = (
        f"unpickle estimator {type(model).__name__} from sklearn-maf version 0.0.1 when using "
        f"version {sklearn_maf.__version__}"
    )
    with pytest.warns(InconsistentVersionWarning, match=message) as record:
        loaded = pickle.loads(payload)
    warning = record[0].message
    assert warning.original_version == "0.0.1" and warning.current_version == sklearn_maf.__version__
    np.testing.assert_array_equal(loaded.score_samples(*data), model.score_samples(*data))


def test_a_pickle_without_a_version_warns():
    model, _ = _fit(MAFDensity(**SMALL))
    state = model.__getstate__()
    del state["_sklearn_maf_version"]
    with pytest.warns(InconsistentVersionWarning, match="from sklearn-maf version unknown"):
        MAFDensity.__new__(MAFDensity).__setstate__(state)


def test_a_flow_class_this_version_lacks_raises_a_clear_error(fitted, monkeypatch):
    """A class of the fitted flow that moved or was renamed: a clear error before pickle's own.

    Without the check, pickle fails with "Can't get attribute" (or an import
    error), naming neither the versions nor a remedy.
    """
    model, _ = fitted
    payload = pickle.dumps(model)
    base_class = type(model.module_.base)
    monkeypatch.delattr(sys.modules[base_class.__module__], base_class.__name__)
    message = (
        f"needs the class {base_class.__qualname__} from {base_class.__module__}, which "
        f"sklearn-maf {sklearn_maf.__version__} does not have: refit it"
    )
    with pytest.raises(IncompatiblePickleError, match=message):
        pickle.loads(payload)


def test_a_flow_module_this_version_lacks_raises_a_clear_error(monkeypatch):
    model, _ = _fit(MAFDensity(**SMALL))
    payload = pickle.dumps(model)
    monkeypatch.setitem(sys.modules, type(model.module_).__module__, None)  # the import fails
    with pytest.raises(IncompatiblePickleError, match=f"from {type(model.module_).__module__}, which"):
        pickle.loads(payload)


def test_a_fitted_attribute_the_pickle_lacks_raises_a_clear_error():
    model, _ = _fit(MAFDensity(**SMALL))
    del model.discrete_features_  # as from a version before it existed
    payload = pickle.dumps(model)
    with pytest.raises(IncompatiblePickleError, match=r"lacks the fitted attributes \['discrete_features_'\]"):
        pickle.loads(payload)


def test_the_fitted_attributes_checked_at_loading_are_those_a_fit_sets(fitted):
    model, _ = fitted
    missing = [name for name in model._fitted_attributes if not hasattr(model, name)]
    assert not missing


def test_an_unfitted_estimator_pickles():
    model = MAFConditionalDensity(n_layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InconsistentVersionWarning)
        loaded = pickle.loads(pickle.dumps(model))
    assert loaded.get_params() == model.get_params()
