"""nanoseg: find nanoparticles in volume electron microscopy.

The estimators compose in scikit-learn pipelines::

    from sklearn.pipeline import Pipeline
    from nanoseg import NanoparticleMixture, NanoparticleLabeler

    pipe = Pipeline([("mixture", NanoparticleMixture()), ("labeler", NanoparticleLabeler())])
    labels = pipe.fit_transform(volume)

Names are imported on first use, so that ``import nanoseg`` (and the
``nanoseg`` command's ``--help``) stays fast: scikit-learn, SciPy and dask
load only when an estimator is used.
"""

from importlib import import_module

from ._version import __version__

# Public name -> submodule defining it.
_EXPORTS = {
    "EMCollapseError": "._model",
    "GPUUnavailableError": "._backend",
    "NanoparticleClassifier": ".classifier",
    "NanoparticleLabeler": ".labeler",
    "NanoparticleMixture": ".mixture",
    "tune": ".tuning",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS})
