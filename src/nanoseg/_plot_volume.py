"""Figures of one plane of a volume, for :mod:`nanoseg.plotting`.

The image with its particles coloured and outlined, and the image beside
its particle probability map (and the particles found). Only the plane shown
is read, so the inputs may be zarr or dask arrays larger than memory;
scikit-image is imported only when a figure is drawn.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._plot_common import busiest_plane, check_plane, grey, new_axes, panels, require_matplotlib, where
from ._volume import as_volume


def _same_shape(image, name, array, hint):
    if tuple(array.shape) != tuple(image.shape):
        raise ValueError(
            f"image has shape {tuple(image.shape)} but {name} has shape {tuple(array.shape)}; {hint}"
        )


def _check_labels_dtype(label_volume):
    if label_volume.dtype.kind not in "biu":
        raise TypeError(f"labels must be integer labels or a boolean mask; got dtype {label_volume.dtype}.")


def _particles(ids):
    """``"N particle(s)"`` for the labels of one plane."""
    n_particles = np.unique(ids[ids > 0]).size
    return f"{n_particles} particle{'s' if n_particles != 1 else ''}"


def colour_labels(ids, shown, alpha, palette_labels=None):
    """``skimage.color.label2rgb(ids, image=shown, bg_label=0, bg_color=None, alpha=alpha)``.

    The same colours (scikit-image's default cycle, in the order of the
    sorted labels) blended the same way, but computed on the labelled pixels
    only: label2rgb ranks every pixel's label with a sort of the whole
    plane, which took about a second on a 2048 x 2048 plane. With
    `palette_labels` (sorted, containing every label of `ids`), labels are
    ranked among those instead, so that part of a plane gets the colours the
    whole plane would.
    """
    from skimage.color import color_dict
    from skimage.color.colorlabel import DEFAULT_COLORS

    rgb = np.repeat(np.asarray(shown, dtype=np.float64)[..., None], 3, axis=-1)
    labelled = ids != 0
    values = ids[labelled]
    if values.size:
        palette = np.array([color_dict[name] for name in DEFAULT_COLORS], dtype=np.float64)
        ranked = np.unique(values) if palette_labels is None else palette_labels
        rank = np.searchsorted(ranked, values)
        rgb[labelled] = palette[rank % len(palette)] * alpha + rgb[labelled] * (1 - alpha)
    return rgb


def outer_boundaries(ids):
    """``skimage.segmentation.find_boundaries(ids, mode="outer")`` of a 2D label image.

    The same pixels (for labels of up to 32 bits: with int64 labels
    scikit-image's erosion overflows and also marks particle pixels on the
    image's edge), found only around the labelled ones: a boundary pixel is
    a labelled pixel or one of its 8 neighbours, and whether it is one
    depends on its 3 x 3 neighbourhood alone (neighbours beyond the edge
    repeat the edge, as scikit-image's reflected borders do at this
    radius). The whole-plane filters took about 0.4 s on a 2048 x 2048 plane.
    """
    n_rows, n_cols = ids.shape
    out = np.zeros(ids.shape, dtype=bool)
    rows, cols = np.nonzero(ids)
    if rows.size == 0:
        return out
    if rows.size > ids.size // 16:
        # Densely labelled: the candidates' neighbourhoods would take more
        # memory than the whole-plane filters, for no gain.
        from skimage.segmentation import find_boundaries

        wide = ids.max() >= np.iinfo(np.int32).max
        return find_boundaries(ids if wide else ids.astype(np.int32), mode="outer")
    steps = np.array([(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)])

    def neighbourhoods(rows, cols):
        # (pixels, 9) rows and columns of each pixel's 3 x 3 neighbourhood,
        # the edge repeated beyond the image.
        return (
            np.clip(rows[:, None] + steps[:, 0], 0, n_rows - 1),
            np.clip(cols[:, None] + steps[:, 1], 0, n_cols - 1),
        )

    near_rows, near_cols = neighbourhoods(rows, cols)
    candidates = np.unique(near_rows * n_cols + near_cols)
    around = ids[neighbourhoods(*np.divmod(candidates, n_cols))]
    cross = around[:, [1, 3, 4, 5, 7]]
    changes = cross.max(axis=1) != cross.min(axis=1)
    background = around[:, 4] == 0
    # Between two particles: the neighbourhood's largest label differs from
    # its smallest particle label (background counted as above every label).
    particles_only = np.where(around == 0, np.iinfo(np.int64).max, around.astype(np.int64))
    adjacent = (around.max(axis=1) != particles_only.min(axis=1)) & ~background
    out.reshape(-1)[candidates[changes & (background | adjacent)]] = True
    return out


def busiest_window(ids, size):
    """(rows, cols) slices of the `size` x `size` window of `ids` holding the most labelled pixels.

    Windows start on a grid of a quarter of `size`; ties go to the first in
    raster order, and a plane without particles gives its centre. A plane
    smaller than `size` along an axis is shown whole along it.
    """
    labelled = np.asarray(ids) != 0
    step = max(1, size // 4)
    starts = []
    for n in labelled.shape:
        width = min(size, n)
        axis_starts = np.arange(0, n - width + 1, step)
        if axis_starts[-1] != n - width:
            axis_starts = np.append(axis_starts, n - width)  # a window flush with the far edge too
        starts.append((axis_starts, width))
    (row_starts, height), (col_starts, width) = starts
    table = np.zeros((labelled.shape[0] + 1, labelled.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = labelled.cumsum(axis=0).cumsum(axis=1)
    r, c = np.ix_(row_starts, col_starts)
    counts = table[r + height, c + width] - table[r, c + width] - table[r + height, c] + table[r, c]
    if counts.max() == 0:
        row0, col0 = (labelled.shape[0] - height) // 2, (labelled.shape[1] - width) // 2
    else:
        i, j = np.unravel_index(np.argmax(counts), counts.shape)
        row0, col0 = int(row_starts[i]), int(col_starts[j])
    return slice(row0, row0 + height), slice(col0, col0 + width)


def check_window(window, shape):
    """`window` (None, a size or a pair of slices) as (rows, cols) slices, or None for the whole plane."""
    if window is None:
        return None
    if isinstance(window, numbers.Integral) and not isinstance(window, bool):
        if window < 1:
            raise ValueError(f"window must be a positive size in pixels; got {window}.")
        return int(window)
    if isinstance(window, tuple) and len(window) == 2 and all(isinstance(s, slice) for s in window):
        bounds = [s.indices(n) for s, n in zip(window, shape)]
        if any(step != 1 or stop <= start for start, stop, step in bounds):
            raise ValueError(f"window must select at least one row and one column, without steps; got {window!r}.")
        return tuple(slice(start, stop) for start, stop, _ in bounds)
    raise TypeError(f"window must be None, a size in pixels or a pair of slices (rows, cols); got {window!r}.")


def _window_overlay(ids, shown, alpha, rows, cols):
    """The whole plane's overlay, cut to `rows`, `cols`, computed on the window only.

    Colours are ranked among the plane's labels and outlines found on the
    window grown by one pixel, so the window shows exactly those pixels of
    the whole plane's overlay.
    """
    rgb = colour_labels(ids[rows, cols], shown[rows, cols], alpha, palette_labels=np.unique(ids[ids > 0]))
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip((rows, cols), ids.shape))
    inner = tuple(slice(s.start - g.start, s.start - g.start + (s.stop - s.start)) for s, g in zip((rows, cols), grown))
    rgb[outer_boundaries(ids[grown])[inner]] = (1.0, 1.0, 0.0)
    return rgb


def draw_overlay(image, labels, plane, ax, alpha, window=None):
    """Draw one plane with its particles coloured and outlined; see ``plot_overlay``."""
    image_volume = as_volume(image, name="image")
    label_volume = as_volume(labels, name="labels")
    _same_shape(image, "labels", labels, "pass the labels computed from this image.")
    _check_labels_dtype(label_volume)
    window = check_window(window, label_volume.shape[-2:])
    plane = check_plane(plane, label_volume, lambda: busiest_plane(label_volume))
    ids = label_volume.read(plane, plane + 1)[0].astype(np.int64)
    shown = grey(image_volume.read(plane, plane + 1)[0])
    title = f"{where(label_volume, plane)}: "
    extent = None
    if window is None:
        rgb = colour_labels(ids, shown, alpha)
        # As mark_boundaries(rgb, ids, color=(1, 1, 0), mode="outer").
        rgb[outer_boundaries(ids)] = (1.0, 1.0, 0.0)
    else:
        rows, cols = busiest_window(ids, window) if isinstance(window, int) else window
        rgb = _window_overlay(ids, shown, alpha, rows, cols)
        ids = ids[rows, cols]
        # Axes in the plane's own pixel coordinates, not the window's.
        extent = (cols.start - 0.5, cols.stop - 0.5, rows.stop - 0.5, rows.start - 0.5)
        title += f"rows {rows.start}-{rows.stop - 1}, columns {cols.start}-{cols.stop - 1}, "
    ax = new_axes(ax)
    ax.imshow(rgb, interpolation="nearest", extent=extent)
    ax.set_title(title + _particles(ids))
    ax.set_xlabel("x (column)")
    ax.set_ylabel("y (row)")
    return ax


def draw_probability(image, probability, labels, plane, axes, threshold):
    """Draw image, probability map and outlined particles; see ``plot_probability``."""
    require_matplotlib()
    image_volume = as_volume(image, name="image")
    probability_volume = as_volume(probability, name="probability")
    arrays = {"probability": probability} if labels is None else {"probability": probability, "labels": labels}
    for name, array in arrays.items():
        _same_shape(image, name, array, f"pass the {name} computed from this image.")
    if probability_volume.dtype.kind not in "fb":
        raise TypeError(f"probability must be a float (or boolean) array; got dtype {probability_volume.dtype}.")
    label_volume = None if labels is None else as_volume(labels, name="labels")
    if label_volume is not None:
        _check_labels_dtype(label_volume)
        plane = check_plane(plane, image_volume, lambda: busiest_plane(label_volume))
    else:
        plane = check_plane(plane, image_volume, lambda: busiest_plane(probability_volume, threshold))
    axes = panels(axes, 2 if labels is None else 3, 3)
    shown = grey(np.asarray(image_volume.read(plane, plane + 1)[0]))
    axes[0].imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[0].set_title(where(image_volume, plane))
    values = np.asarray(probability_volume.read(plane, plane + 1)[0], dtype=np.float32)
    mapped = axes[1].imshow(values, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[1].set_title("particle probability")
    axes[1].figure.colorbar(mapped, ax=axes[1], shrink=0.8)
    if label_volume is not None:
        ids = np.asarray(label_volume.read(plane, plane + 1)[0]).astype(np.int64)
        outlined = np.dstack([shown] * 3).astype(np.float64)
        outlined[outer_boundaries(ids)] = (1.0, 1.0, 0.0)  # as mark_boundaries(..., mode="outer")
        axes[2].imshow(outlined, interpolation="nearest")
        axes[2].set_title(_particles(ids))
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return axes
