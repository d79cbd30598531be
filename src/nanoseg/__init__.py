"""nanoseg: find nanoparticles in volume electron microscopy.

The estimators compose in scikit-learn pipelines::

    from sklearn.pipeline import Pipeline
    from nanoseg import NanoparticleMixture, NanoparticleLabeler

    pipe = Pipeline([("mixture", NanoparticleMixture()), ("labeler", NanoparticleLabeler())])
    labels = pipe.fit_transform(volume)
"""

from ._backend import GPUUnavailableError
from ._model import EMCollapseError
from .classifier import NanoparticleClassifier
from .labeler import NanoparticleLabeler
from .mixture import NanoparticleMixture
from .tuning import tune

__version__ = "0.1.0.dev0"

__all__ = [
    "EMCollapseError",
    "GPUUnavailableError",
    "NanoparticleClassifier",
    "NanoparticleLabeler",
    "NanoparticleMixture",
    "__version__",
    "tune",
]
