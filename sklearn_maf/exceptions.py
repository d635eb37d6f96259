"""Warnings and errors that sklearn-maf raises, besides scikit-learn's own."""

import pickle

__all__ = ["IncompatiblePickleError", "InconsistentVersionWarning"]


class InconsistentVersionWarning(UserWarning):
    """An estimator was unpickled by another version of sklearn-maf than pickled it.

    The counterpart of :class:`sklearn.exceptions.InconsistentVersionWarning`
    for this package: the model loaded, but it may score or sample
    differently, or fail later. Refit it with the version in use, or load it
    with the version that pickled it. Turn the warning into an error with
    ``warnings.simplefilter("error", InconsistentVersionWarning)``.

    Parameters
    ----------
    estimator_name : str
        Name of the estimator's class.
    current_version : str
        The sklearn-maf version that loads the pickle.
    original_version : str
        The sklearn-maf version that pickled it.
    """

    def __init__(self, *, estimator_name, current_version, original_version):
        self.estimator_name = estimator_name
        self.current_version = current_version
        self.original_version = original_version

    def __str__(self):
        return (
            f"Trying to unpickle estimator {self.estimator_name} from sklearn-maf version "
            f"{self.original_version} when using version {self.current_version}. This might "
            "lead to breaking code or invalid results: refit the model, or load it with "
            f"sklearn-maf {self.original_version}."
        )


class IncompatiblePickleError(pickle.UnpicklingError):
    """A pickled estimator cannot be loaded by this version of sklearn-maf.

    Raised while unpickling, before the model is used, where the pickle needs
    a class that this version does not have (its code moved or was renamed)
    or lacks a fitted attribute that this version needs. The message names
    what is missing and both versions. A subclass of
    :class:`pickle.UnpicklingError`.
    """
