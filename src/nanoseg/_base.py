"""Behaviour shared by the nanoseg estimators."""

from __future__ import annotations

from . import _version as _version_module
from ._backend import Backend, is_device_array, resolve_backend


class VolumeEstimatorMixin:
    """scikit-learn tags, device choice and pickling for estimators on images and volumes.

    Inputs are 2D images or 3D volumes (not feature matrices) and no target
    is needed. Place it left of ``BaseEstimator``.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = []
        return tags

    def set_output(self, *, transform=None):
        """Choose the output container of `transform`, as scikit-learn's output API does.

        Images and volumes are arrays, not tables: only ``"default"`` (the
        array type of the input, see the estimator's Notes) and None (no
        change) are accepted, so that ``Pipeline.set_output`` works.

        Parameters
        ----------
        transform : {"default"} or None, default=None

        Returns
        -------
        self : estimator

        Raises
        ------
        ValueError
            For ``"pandas"``, ``"polars"`` or any other container.
        """
        if transform not in (None, "default"):
            raise ValueError(
                f"{type(self).__name__} outputs images and volumes, which have no table form: "
                f"set_output(transform={transform!r}) is not supported; use 'default'. To tabulate "
                "particles, use nanoseg.measure.particle_table on the labels."
            )
        return self

    def _resolve_backend(self, volumes):
        """The backend for the `device` hyper-parameter and these volumes (CuPy ones stay on the GPU)."""
        return resolve_backend(self.device, on_device=any(volume.kind == "cupy" for volume in volumes))

    def __getstate__(self):
        # Anything private that lives on a GPU (arrays, or the backend holding
        # CuPy itself) is left out, so that a model used on a GPU loads on a
        # machine without one. Fitted attributes are NumPy by construction.
        state = super().__getstate__()
        state = {
            key: value
            for key, value in state.items()
            if not (key.startswith("_") and (is_device_array(value) or isinstance(value, Backend)))
        }
        # Stamp the version, as scikit-learn does with its own, so that loading
        # the pickle elsewhere can say when it was made by another nanoseg.
        state["_nanoseg_version"] = _version()
        return state

    def __setstate__(self, state):
        state = dict(state)
        saved = state.pop("_nanoseg_version", None)
        if saved is not None and saved != _version():
            import warnings

            from .persistence import ModelVersionWarning

            warnings.warn(ModelVersionWarning(saved, _version()), stacklevel=2)
        super().__setstate__(state)


def _version():
    # Read at call time, so that tests can stand in another version.
    return _version_module.__version__


def map_volumes(function, volumes, is_list):
    """Apply `function` to each volume; a list for a list input, else one result."""
    results = [function(volume) for volume in volumes]
    return results if is_list else results[0]
