"""Array backends for the per-slice kernels.

A backend pairs an array namespace (``xp``) with its ``ndimage`` module
(``ndi``). Kernels in :mod:`nanoseg._kernels` are written once against these
two names. Only the NumPy/SciPy backend exists for now; this is the single
place where a GPU backend will be added, so that nothing else in the package
ever imports an optional array library.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import scipy.ndimage as ndi


@dataclass(frozen=True)
class Backend:
    """An array namespace and the matching ``ndimage`` implementation."""

    name: str
    xp: ModuleType
    ndi: ModuleType

    def to_host(self, array):
        """Return `array` as a NumPy array."""
        return np.asarray(array)


CPU = Backend(name="cpu", xp=np, ndi=ndi)


def get_backend(device="cpu"):
    """Return the backend for `device`.

    Parameters
    ----------
    device : {"cpu"}
        Where the per-slice kernels run.
    """
    if device == "cpu":
        return CPU
    raise ValueError(f"Unknown device {device!r}; expected 'cpu'.")
