"""From a posterior probability map to labelled particles."""

from __future__ import annotations

from numbers import Integral, Real

from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions

from ._backend import CPU, DEVICES
from ._base import VolumeEstimatorMixin, map_volumes
from ._engine.labeling import SlabLabeler
from ._plan import LABEL_BYTES_PER_VOXEL, device_n_jobs, slab_budget
from ._validation import check_memory_budget, check_probabilities, check_targets
from ._volume import as_volumes, is_lazy

__all__ = ["NanoparticleLabeler"]


class NanoparticleLabeler(VolumeEstimatorMixin, TransformerMixin, BaseEstimator):
    """Threshold a posterior and label its connected particles.

    Voxels with ``posterior >= threshold`` are kept, the mask is closed with
    a ball (a disk for 2D input) of `radius` voxels, connected components are
    found with the given `connectivity`, components of fewer than `min_size`
    voxels are dropped, and the rest are numbered 1..K in raster order of
    their first voxel.

    The labeler is stateless: `fit` only validates, and `transform` may be
    called without it.

    Parameters
    ----------
    threshold : float, default=0.95
        Posterior probability at or above which a voxel is foreground.
    radius : int, default=1
        Radius in voxels of the closing's ball/disk; 0 disables the closing.
        The closing never removes foreground, including at the borders.
    connectivity : int, default=2
        Maximum number of orthogonal steps between neighbours, as in
        :func:`skimage.measure.label`: in 3D, 1 is the 6-, 2 the 18- and 3 the
        26-neighbourhood; in 2D, 1 is 4- and 2 is 8-connectivity.
    min_size : int, default=10
        Components with fewer voxels are removed.
    memory_budget : int or str, default=None
        Working memory for the slabs in flight, in bytes or as a string such as
        ``"512MiB"``, shared by the `n_jobs` slabs processed at once (None
        means 128 MiB per job). A slab is never thinner than one input chunk
        (a budget too small for that is exceeded, with a warning), and one
        of dense foreground (above 2 %) needs about twice its share.
    n_jobs : int, default=None
        Threads labelling slabs at once. None takes the ``n_jobs`` of an
        enclosing :func:`joblib.parallel_config`, or else one per CPU; -1
        means one per CPU, -2 all but one, and so on.
    device : {"cpu", "cuda", "auto"}, default="cpu"
        Where slabs are closed and labelled. "cuda" uses a CUDA GPU through
        CuPy (``pip install "nanoseg[gpu]"``) and raises
        :class:`~nanoseg.GPUUnavailableError` without one; "auto" uses
        the GPU when there is one and the CPU otherwise (saying so in the
        "nanoseg" log). CuPy input is always labelled on the GPU (unless
        "cpu", which rejects it). The labels are identical on every device.
    verbose : bool, default=False
        Show progress bars, and print the slab size chosen.

    See Also
    --------
    NanoparticleMixture : Produces the posterior.
    skimage.measure.label : The labelling this reproduces, for in-memory arrays.

    Notes
    -----
    `X` is a posterior map -- float values in [0, 1] -- or a boolean mask,
    shaped (Y, X) or (Z, Y, X), as a NumPy, zarr or dask array, or a list of
    them. Large inputs are labelled slab by slab along Z with exact merging
    across slab faces: the labels are identical to labelling the whole volume
    at once. For zarr and dask inputs one pass runs during `transform`, and
    the labels come back as a lazy dask array whose slabs are recomputed from
    the input when computed; memory stays bounded by the slab size.

    A boolean mask is used as is (`threshold` does not apply). It is how the
    mixture hands over without a float posterior in between:
    ``NanoparticleMixture.predict(X, threshold=t)`` looks each voxel up in
    boolean per-slice tables (one byte a voxel), and labelling that mask
    gives the labels of the posterior at threshold ``t``. A float posterior
    from a zarr or dask input is thresholded inside its own dask graph, one
    chunk at a time.

    Labels are uint32 (uint64 beyond 2**32 - 1 particles).

    On a GPU, each slab's mask is copied there (one byte a voxel; a CuPy
    posterior is thresholded where it is), closed and labelled densely, and
    only its foreground voxels come back for the merge across slabs, which
    runs on the host as on the CPU. CuPy input gives CuPy labels.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoseg import NanoparticleLabeler
    >>> posterior = np.zeros((5, 5))
    >>> posterior[1:3, 1:3] = 0.99
    >>> NanoparticleLabeler(min_size=2).transform(posterior)
    array([[0, 0, 0, 0, 0],
           [0, 1, 1, 0, 0],
           [0, 1, 1, 0, 0],
           [0, 0, 0, 0, 0],
           [0, 0, 0, 0, 0]], dtype=uint32)
    """

    _parameter_constraints = {
        "threshold": [Interval(Real, 0, 1, closed="both")],
        "radius": [Interval(Integral, 0, None, closed="left")],
        "connectivity": [Interval(Integral, 1, 3, closed="both")],
        "min_size": [Interval(Integral, 0, None, closed="left")],
        "memory_budget": [None, Interval(Integral, 1, None, closed="left"), str],
        "n_jobs": [None, Integral],
        "device": [StrOptions(set(DEVICES))],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        threshold=0.95,
        radius=1,
        connectivity=2,
        min_size=10,
        memory_budget=None,
        n_jobs=None,
        device="cpu",
        verbose=False,
    ):
        self.threshold = threshold
        self.radius = radius
        self.connectivity = connectivity
        self.min_size = min_size
        self.memory_budget = memory_budget
        self.n_jobs = n_jobs
        self.device = device
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags

    def _posterior_volumes(self, X):
        self._validate_params()
        check_memory_budget(self.memory_budget)
        volumes, is_list = as_volumes(X)
        for volume in volumes:
            name = volume.name
            if volume.dtype != bool and volume.dtype.kind != "f":
                raise TypeError(
                    f"{name} must be a posterior probability map (float in [0, 1]) or a "
                    f"boolean mask; got {volume.dtype}. Pass the output of "
                    "NanoparticleMixture.transform, not the raw image."
                )
            if volume.in_memory and volume.dtype != bool:
                check_probabilities(volume.array, name)
            ndim = 2 if volume.is_2d else 3
            if self.connectivity > ndim:
                raise ValueError(
                    f"connectivity={self.connectivity} is not defined for the {ndim}D {name}; "
                    f"use a value from 1 to {ndim}."
                )
        return volumes, is_list

    def fit(self, X, y=None):
        """Validate the parameters, `X` and the device; nothing is learned.

        Parameters
        ----------
        X : array or list of arrays
            Posterior maps or boolean masks.
        y : ignored
            Present for pipelines; when given, its number of masks and their
            dimensionality are checked against `X` (not their shape, which is
            finer than `X` after a downsampling
            :class:`~nanoseg.preprocessing.PosteriorSmoother`).

        Returns
        -------
        self : NanoparticleLabeler
        """
        volumes, is_list = self._posterior_volumes(X)
        # Annotations stay at full resolution when a smoother downsampled X.
        check_targets(y, volumes, is_list, same_shape=False)
        self._resolve_backend(volumes)  # fail here, not in transform, without the device asked for
        return self

    def transform(self, X):
        """Label the particles of `X`.

        Parameters
        ----------
        X : array or list of arrays
            Posterior maps (float in [0, 1]) or boolean masks, (Y, X) or
            (Z, Y, X), NumPy, zarr or dask.

        Returns
        -------
        labels : array or list of arrays, uint32
            Same shape as `X`; 0 is background, particles are 1..K. NumPy in
            gives NumPy out, CuPy in gives CuPy out; zarr or dask in gives a
            lazy dask array.

        Notes
        -----
        A lazy 3D result is a plain dask array, but nanoseg keeps the particle
        voxels the labelling found, slab by slab, for as long as the array
        lives: :func:`nanoseg.io.write_ome_zarr` writes the labels from those,
        chunk by chunk, without making dense blocks (much faster than
        :func:`dask.array.store`), and :func:`nanoseg.measure.particle_table`
        measures the particles from them. A lazy posterior
        from :class:`NanoparticleMixture` is thresholded through the mixture's
        boolean tables rather than as floats (the same voxels).
        """
        volumes, is_list = self._posterior_volumes(X)
        backend = self._resolve_backend(volumes)
        return map_volumes(lambda volume: self._label(volume, backend), volumes, is_list)

    def _label(self, volume, backend=CPU):
        n_jobs = device_n_jobs(self.n_jobs, backend, on_device=volume.kind == "cupy")
        labeler = SlabLabeler(
            volume,
            threshold=float(self.threshold),
            radius=int(self.radius),
            connectivity=int(self.connectivity),
            min_size=int(self.min_size),
            budget=slab_budget(self.memory_budget, n_jobs),
            n_jobs=n_jobs,
            device=backend.name,
        )
        if self.verbose:
            print(volume.describe_plan(labeler.depth, LABEL_BYTES_PER_VOXEL, "labelling"))
        if is_lazy(volume.array):
            return volume.restore(labeler.label_lazy(verbose=self.verbose))
        return volume.restore(labeler.label_in_memory(verbose=self.verbose))

