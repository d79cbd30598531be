"""Figures of a fitted intensity mixture, for :mod:`nanoseg.plotting`.

Its intensity PMFs with the two fitted thresholds, and the particle fraction
of each slice along Z against that of the whole stack.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ._plot_common import new_axes

# What the figures and the report read from a fitted NanoparticleMixture.
MIXTURE_ATTRIBUTES = (
    "stack_pmf_", "background_pmf_", "particle_pmf_", "background_weight_",
    "low_intensity_", "high_intensity_", "stack_histogram_",
)


def check_mixture(mixture):
    """Raise unless `mixture` is fitted and has what the figures read."""
    check_is_fitted(mixture)
    missing = [name for name in MIXTURE_ATTRIBUTES if not hasattr(mixture, name)]
    if missing:
        raise TypeError(
            f"Expected a fitted NanoparticleMixture; {type(mixture).__name__} has no "
            f"{', '.join(missing)}."
        )


def draw_mixture(mixture, ax):
    """Draw the PMFs and thresholds of a checked mixture; see ``plot_mixture``."""
    ax = new_axes(ax)
    intensities = np.arange(mixture.stack_pmf_.size)
    weight = float(mixture.background_weight_)
    ax.plot(intensities, mixture.stack_pmf_, color="0.2", label="stack")
    ax.plot(intensities, weight * mixture.background_pmf_, color="C0", label=f"background (weight {weight:.4f})")
    ax.plot(
        intensities, (1.0 - weight) * mixture.particle_pmf_, color="C3",
        label=f"particles (weight {1.0 - weight:.2g})",
    )
    low, high = int(mixture.low_intensity_), int(mixture.high_intensity_)
    ax.axvline(low, color="C2", linestyle="--", label=f"seed intensity {low}")
    ax.axvline(high, color="C1", linestyle=":", label=f"never background from {high}")
    ax.set_yscale("log")
    # PMF bins are floored at `eps`; show down to one voxel's share instead.
    n_voxels = max(1, int(np.sum(mixture.stack_histogram_)))
    ax.set_ylim(0.5 / n_voxels, 2.0 * float(np.max(mixture.stack_pmf_)))
    ax.set_xlim(0, intensities[-1])
    ax.set_xlabel("intensity (grey level)")
    ax.set_ylabel("probability")
    ax.set_title("Intensity mixture")
    ax.legend(fontsize="small")
    return ax


def draw_slice_weights(ax, weights, stack_weight):
    """Draw per-slice particle fractions (one line per crop for a list) on `ax`."""
    if isinstance(weights, list):
        for i, crop in enumerate(weights):
            ax.plot(np.arange(crop.size), crop, marker=".", label=f"crop {i}")
    else:
        ax.plot(np.arange(weights.size), weights, marker=".", color="C3", label="per slice (MAP)")
    ax.axhline(stack_weight, color="0.5", linestyle="--", label=f"whole stack (EM), {stack_weight:.2g}")
    ax.set_xlabel("slice (z)")
    ax.set_ylabel("particle fraction")
    ax.set_title("Particle fraction per slice")
    ax.legend(fontsize="small")
    return ax
