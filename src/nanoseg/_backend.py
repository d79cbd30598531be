"""Array backends for the per-slice kernels: NumPy/SciPy on the CPU, CuPy on a GPU.

A backend pairs an array namespace (``xp``) with its ``ndimage`` module
(``ndi``). Kernels in :mod:`nanoseg._ops` are written once against these
two names, plus the few operations whose spelling differs between the two
libraries (copies between host and device, scatter-add, streams).

This is the only module that imports CuPy, and only when a GPU is asked for
(``device="cuda"``), looked for (``device="auto"``), or when the caller already
holds CuPy arrays: ``import nanoseg`` and every ``device="cpu"`` run leave
CuPy unimported.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import scipy.ndimage as ndi

logger = logging.getLogger("nanoseg")

#: Values of the estimators' ``device`` hyper-parameter.
DEVICES = ("auto", "cpu", "cuda")

#: Set to False to run the generic CuPy code instead of the hand-written CUDA
#: kernels of :mod:`nanoseg._ops` (the GPU tests compare both with the CPU).
FAST_KERNELS = True

INSTALL_HINT = (
    'Install CuPy for your CUDA version: pip install "nanoseg[gpu]" for CUDA 12 '
    "(it installs cupy-cuda12x), or pip install cupy-cuda13x for CUDA 13."
)


class GPUUnavailableError(RuntimeError):
    """Raised when ``device="cuda"`` is asked for but no usable CUDA GPU is found."""


def _host_copy(array, out=None):
    if out is None:
        return np.asarray(array)
    out[...] = array
    return out


@dataclass(frozen=True)
class Backend:
    """An array namespace, the matching ``ndimage``, and device helpers.

    Attributes
    ----------
    name : str
        "cpu", or "cuda" for a GPU backend.
    xp, ndi : module
        NumPy and :mod:`scipy.ndimage`, or CuPy and :mod:`cupyx.scipy.ndimage`.
    array_type : type
        The backend's array class.
    download : callable
        ``download(array, out=None)``: a backend array as a NumPy array.
    new_stream : callable or None
        Makes a stream, so that threads overlap copies and kernels.
    synchronize : callable
        Waits for all work queued on the device.
    """

    name: str
    xp: ModuleType
    ndi: ModuleType
    array_type: type = np.ndarray
    download: Callable = _host_copy
    new_stream: Callable | None = None
    synchronize: Callable = lambda: None

    @property
    def is_gpu(self):
        """True for a backend whose arrays live on a GPU."""
        return self.name != "cpu"

    def owns(self, array):
        """True when `array` is an array of this backend."""
        return isinstance(array, self.array_type)

    def to_device(self, array):
        """`array` as an array of this backend (no copy when it already is one)."""
        if self.owns(array):
            return array
        return self.xp.asarray(array)

    def to_host(self, array, out=None):
        """`array` as a NumPy array, written into `out` when given."""
        if self.is_gpu and self.owns(array):
            return self.download(array, out)
        return _host_copy(array, out)

    def stream(self):
        """Context in which this thread's device work goes to its own stream.

        Threads that each upload a slab, compute and download on their own
        stream let the copies of one slab overlap the kernels of another. On
        the CPU it does nothing.
        """
        if self.new_stream is None:
            return nullcontext()
        streams = _THREAD_STATE.__dict__.setdefault("streams", {})
        if self.name not in streams:
            streams[self.name] = self.new_stream()
        return streams[self.name]


_THREAD_STATE = threading.local()

CPU = Backend(name="cpu", xp=np, ndi=ndi)


# -- loading a GPU backend ----------------------------------------------------
_GPU = None
_GPU_LOCK = threading.Lock()


def _cupy_download(array, out=None):
    if out is not None and out.flags.c_contiguous and array.flags.c_contiguous:
        return array.get(out=out)
    return _host_copy(array.get(), out)


def _load_gpu():
    """Import CuPy and build the CUDA backend, or raise GPUUnavailableError."""
    try:
        import cupy
        import cupyx.scipy.ndimage as cundi
    except ImportError as exc:
        raise GPUUnavailableError(
            f"device='cuda' needs CuPy, which could not be imported ({exc}). {INSTALL_HINT}"
        ) from exc
    try:
        available = bool(cupy.is_available())
    except (RuntimeError, OSError, ImportError):  # a broken CUDA install raises from the driver query
        available = False
    if not available:
        raise GPUUnavailableError(
            "CuPy is installed but finds no usable CUDA device. Check that a GPU is visible "
            "(nvidia-smi, CUDA_VISIBLE_DEVICES) and that the CuPy package matches the installed "
            f"CUDA version. {INSTALL_HINT} Or use device='cpu'."
        )
    return Backend(
        name="cuda",
        xp=cupy,
        ndi=cundi,
        array_type=cupy.ndarray,
        download=_cupy_download,
        # Blocking streams: they overlap one another but stay ordered with
        # the default stream, on which callers' own CuPy work runs.
        new_stream=cupy.cuda.Stream,
        synchronize=lambda: cupy.cuda.Device().synchronize(),
    )


def gpu_backend():
    """The CUDA backend, loaded on first use.

    Raises
    ------
    GPUUnavailableError
        When CuPy is missing or sees no usable device.
    """
    global _GPU
    with _GPU_LOCK:
        if _GPU is None:
            _GPU = _load_gpu()
        return _GPU


def _find_gpu():
    """The CUDA backend, or None and the reason there is none (imports CuPy only if installed)."""
    if _GPU is None and importlib.util.find_spec("cupy") is None:
        return None, "CuPy is not installed"
    try:
        return gpu_backend(), ""
    except GPUUnavailableError as exc:
        return None, str(exc)


#: Reasons for an "auto" fallback already logged in this process.
_REPORTED = set()


def get_backend(device="cpu"):
    """Return the backend for `device`.

    Parameters
    ----------
    device : {"cpu", "cuda", "auto"}
        Where the kernels run. "auto" takes the GPU when CuPy finds one and
        otherwise the CPU, saying why in the "nanoseg" log (level INFO, once
        per reason and process).

    Raises
    ------
    GPUUnavailableError
        For "cuda" without a usable GPU.
    ValueError
        For any other value.
    """
    if device == "cpu":
        return CPU
    if device == "cuda":
        return gpu_backend()
    if device == "auto":
        backend, reason = _find_gpu()
        if backend is None:
            # Once per reason and process: grid searches resolve the device many times.
            if reason not in _REPORTED:
                _REPORTED.add(reason)
                logger.info("device='auto': no usable GPU (%s); running on the CPU.", reason)
            return CPU
        return backend
    raise ValueError(f"Unknown device {device!r}; expected one of {', '.join(map(repr, DEVICES))}.")


def _device_array_types():
    # CuPy arrays exist only once CuPy is imported, so its absence from
    # sys.modules means no input can be one (and keeps CuPy unimported).
    cupy = sys.modules.get("cupy")
    return (cupy.ndarray,) if cupy is not None else ()


def is_device_array(array):
    """True for an array that lives on a GPU (a CuPy array)."""
    types = _device_array_types()
    return bool(types) and isinstance(array, types)


def to_numpy(array):
    """Any array (NumPy, CuPy, array-like) as a NumPy array."""
    if is_device_array(array):
        return gpu_backend().to_host(array)
    return np.asarray(array)


def resolve_backend(device, on_device=False):
    """Backend for an estimator's `device`, given whether its input is on a GPU.

    Input already on the GPU is processed there with "auto" and "cuda".

    Raises
    ------
    ValueError
        For GPU input with ``device="cpu"``.
    GPUUnavailableError
        For "cuda" without a usable GPU.
    """
    if on_device:
        if device == "cpu":
            raise ValueError(
                "X is a CuPy array (on the GPU) but device='cpu'. Use device='cuda' or 'auto' to "
                "process it where it is, or copy it to the host first with cupy.asnumpy(X)."
            )
        return gpu_backend()
    return get_backend(device)
