"""Pickles across versions: record the version, warn on another, raise on an unusable pickle.

The estimators pickle through :func:`pickling_reduction`, so that unpickling
first calls :func:`_unpickle`, before pickle reads the state: a model whose
fitted flow needs a class this version does not have raises a clear
:class:`~sklearn_maf.exceptions.IncompatiblePickleError` instead of an import
error from inside pickle. :func:`checked_state` then warns where another
version made the pickle and raises where a fitted attribute is missing.
``_unpickle`` is named in every pickle: it must keep its name and module.
"""

import importlib
import warnings

import torch

from . import __version__
from .exceptions import IncompatiblePickleError, InconsistentVersionWarning

_VERSION_KEY = "_sklearn_maf_version"


def pickling_reduction(estimator, reduction):
    """``object.__reduce_ex__``'s ``reduction`` of ``estimator``, made to unpickle through :func:`_unpickle`."""
    _, _, state, *rest = reduction  # copyreg's constructor and its arguments, the state, ...
    return (_unpickle, (type(estimator), __version__, _sklearn_maf_classes(state)), state, *rest)


def record_version(state):
    """``state`` with the version of sklearn-maf that pickles it."""
    state[_VERSION_KEY] = __version__
    return state


def checked_state(estimator, state):
    """The pickled ``state`` of ``estimator`` without the version, once checked.

    Warns with :class:`~sklearn_maf.exceptions.InconsistentVersionWarning`
    where another version (or one that recorded none) pickled it; raises
    :class:`~sklearn_maf.exceptions.IncompatiblePickleError` where a fitted
    state lacks one of ``estimator._fitted_attributes``.
    """
    state = dict(state)
    version = state.pop(_VERSION_KEY, "unknown")
    name = type(estimator).__name__
    if version != __version__:
        warnings.warn(
            InconsistentVersionWarning(estimator_name=name, current_version=__version__, original_version=version)
        )
    missing = [attribute for attribute in estimator._fitted_attributes if attribute not in state]
    if "module_" in state and missing:
        raise IncompatiblePickleError(
            f"This {name} was pickled by sklearn-maf {version} and lacks the fitted attributes "
            f"{missing}, which sklearn-maf {__version__} needs: refit it, or load it with "
            f"sklearn-maf {version}."
        )
    return state


def _sklearn_maf_classes(state):
    """Where the classes of this package that ``state`` holds live: "module:qualname" strings.

    The fitted flow's modules, and any other object of this package's classes
    among the values (the outlier detector's marginal transform).
    """
    objects = list(state.values())
    objects += [child for value in state.values() if isinstance(value, torch.nn.Module) for child in value.modules()]
    classes = {type(obj) for obj in objects if type(obj).__module__.startswith("sklearn_maf.")}
    return sorted(f"{cls.__module__}:{cls.__qualname__}" for cls in classes)


def _unpickle(cls, version, classes):
    """A new, empty ``cls`` to unpickle into, once the classes its state holds are found.

    Pickle calls this before it reads the state, so that a model whose flow
    is built from classes this version does not have raises a clear
    :class:`~sklearn_maf.exceptions.IncompatiblePickleError` instead of an
    import error from inside the pickle.
    """
    for name in classes:
        module_name, qualname = name.split(":")
        try:
            obj = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise IncompatiblePickleError(
                f"This {cls.__name__} was pickled by sklearn-maf {version}, and its fitted model needs "
                f"the class {qualname} from {module_name}, which sklearn-maf {__version__} does not "
                f"have: refit it, or load it with sklearn-maf {version}."
            ) from exc
    return cls.__new__(cls)
