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
    return _count(np.unique(ids[ids > 0]).size)


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


#: Longest side, in pixels, of a whole-plane overlay. A larger plane is shown
#: reduced by a whole factor, each block of pixels as one pixel (its largest
#: label, so that no particle disappears, over the block's mean intensity),
#: read band by band: a figure shows far fewer pixels anyway, and the
#: full-resolution overlay of a 16384 x 16384 plane would take about 25 GB.
OVERVIEW_PIXELS = 2048

#: Bytes (as int64 values) of a band of rows read at a time when a figure scans a whole plane.
BAND_BYTES = 32 * 2**20


def _window_starts(n, size):
    """Starts of the windows of `size` (at most `n`) along an axis of `n` pixels,
    on a grid of a quarter of `size`, and one flush with the far edge; and
    the window's width."""
    width = min(size, n)
    starts = np.arange(0, n - width + 1, max(1, size // 4))
    if starts[-1] != n - width:
        starts = np.append(starts, n - width)  # a window flush with the far edge too
    return starts, width


def _bands(n_rows, n_cols, multiple=1):
    """(start, stop) bands of whole rows of about BAND_BYTES of int64 values,
    each (but the last) a multiple of `multiple` rows."""
    rows = max(1, BAND_BYTES // max(1, 8 * n_cols))
    rows = max(multiple, rows // multiple * multiple)
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def _blocks(values, step, fill):
    """`values` (2D) padded with `fill` to whole `step` x `step` blocks, as
    (block rows, step, block columns, step)."""
    n, m = values.shape
    rows, cols = -(-n // step), -(-m // step)
    padded = np.full((rows * step, cols * step), fill, dtype=values.dtype)
    padded[:n, :m] = values
    return padded.reshape(rows, step, cols, step)


class _PlaneScan:
    """What the figures of one plane need of the whole plane, gathered band by band.

    `label_volume` and `probability_volume` may be None. Attributes set by
    :meth:`run`: ``labels`` (the plane's positive labels, sorted; empty
    without labels), ``low`` and ``high`` (its intensities' extremes); with
    a `step`, the plane reduced by `step`: ``mean`` (each block's mean
    intensity), ``ids`` (its largest label) and ``probability`` (its largest
    probability); with a window `size`, ``window``: the rows and columns of
    the `size` x `size` window holding the most labelled pixels, among
    windows starting on a grid of a quarter of `size` and those flush with
    the far edges (a plane smaller than `size` along an axis is taken whole
    along it).
    """

    def __init__(self, image_volume, label_volume, plane, step=None, size=None, probability_volume=None):
        self.image_volume, self.label_volume, self.plane = image_volume, label_volume, plane
        self.probability_volume = probability_volume
        self.step, self.size = step, size

    def run(self):
        n_rows, n_cols = self.image_volume.shape[1:]
        step = self.step or 1
        labels, low, high = [np.empty(0, dtype=np.int64)], np.inf, -np.inf
        reduced = {"mean": [], "ids": [], "probability": []}
        if self.size:
            row_starts, height = _window_starts(n_rows, self.size)
            col_starts, width = _window_starts(n_cols, self.size)
            # Labelled pixels of each row in the window of each column
            # start, summed over the rows above each row that bounds a
            # window: the windows' counts, without a table of the plane.
            bounds = np.unique(np.concatenate([row_starts, row_starts + height]))
            above = np.zeros((bounds.size, col_starts.size), dtype=np.int64)
            running = np.zeros(col_starts.size, dtype=np.int64)
        for start, stop in _bands(n_rows, n_cols, step):
            rows, cols = slice(start, stop), slice(None)
            if self.label_volume is not None:
                ids = self.label_volume.read_region(self.plane, rows, cols)
                labels.append(np.unique(ids[ids > 0]).astype(np.int64))
            if self.image_volume.dtype != np.uint8 or self.step:
                values = self.image_volume.read_region(self.plane, rows, cols)
                if values.size:
                    low, high = min(low, float(values.min())), max(high, float(values.max()))
            if self.step:
                # Blocks of step x step pixels; the plane's last ones may be cut short.
                sums = _blocks(values.astype(np.float64), step, 0.0).sum(axis=(1, 3))
                counts = _blocks(np.ones(values.shape), step, 0.0).sum(axis=(1, 3))
                reduced["mean"].append(sums / counts)
                if self.label_volume is not None:
                    reduced["ids"].append(_blocks(ids.astype(np.int64), step, 0).max(axis=(1, 3)))
                if self.probability_volume is not None:
                    probability = self.probability_volume.read_region(self.plane, rows, cols).astype(np.float32)
                    reduced["probability"].append(_blocks(probability, step, -np.inf).max(axis=(1, 3)))
            if self.size:
                per_row = np.zeros((stop - start, n_cols + 1), dtype=np.int64)
                np.cumsum(ids != 0, axis=1, out=per_row[:, 1:])
                in_windows = per_row[:, col_starts + width] - per_row[:, col_starts]
                cumulative = running + np.cumsum(in_windows, axis=0)
                inside = (bounds > start) & (bounds <= stop)
                above[inside] = cumulative[bounds[inside] - start - 1]
                running = cumulative[-1]
        self.labels = np.unique(np.concatenate(labels))
        self.low, self.high = low, high
        for name, parts in reduced.items():
            if parts:
                setattr(self, name, np.concatenate(parts))
        if self.size:
            at = {int(b): i for i, b in enumerate(bounds)}
            counts = np.array([above[at[int(r + height)]] - above[at[int(r)]] for r in row_starts])
            # Ties go to the first window in raster order; a plane without
            # particles gives its centre.
            if counts.max() == 0:
                row0, col0 = (n_rows - height) // 2, (n_cols - width) // 2
            else:
                i, j = np.unravel_index(np.argmax(counts), counts.shape)
                row0, col0 = int(row_starts[i]), int(col_starts[j])
            self.window = slice(row0, row0 + height), slice(col0, col0 + width)
        return self

    def shade(self, values):
        """`values` of the image scaled to [0, 1] as :func:`~nanoseg._plot_common.grey`
        scales the whole plane."""
        values = np.asarray(values, dtype=np.float64)
        if self.image_volume.dtype == np.uint8:
            return values / 255.0
        if self.low < 0 or self.high > 1:
            return (values - self.low) / (self.high - self.low) if self.high > self.low else np.zeros_like(values)
        return values


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


def _window_overlay(image_volume, label_volume, plane, scan, alpha, rows, cols):
    """The whole plane's overlay, cut to `rows`, `cols`, read and computed on the window only.

    Colours are ranked among the plane's labels (`scan`, a :class:`_PlaneScan`)
    and outlines found on the window grown by one pixel, so the window shows
    exactly those pixels of the whole plane's overlay. Returns the RGB window
    and its labels.
    """
    n_rows, n_cols = label_volume.shape[1:]
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip((rows, cols), (n_rows, n_cols)))
    inner = tuple(slice(s.start - g.start, s.start - g.start + (s.stop - s.start)) for s, g in zip((rows, cols), grown))
    ids = label_volume.read_region(plane, *grown).astype(np.int64)
    shown = scan.shade(image_volume.read_region(plane, rows, cols))
    rgb = colour_labels(ids[inner], shown, alpha, palette_labels=scan.labels)
    rgb[outer_boundaries(ids)[inner]] = (1.0, 1.0, 0.0)
    return rgb, ids[inner]


def _count(n_particles):
    return f"{n_particles} particle{'s' if n_particles != 1 else ''}"


def draw_overlay(image, labels, plane, ax, alpha, window=None):
    """Draw one plane with its particles coloured and outlined; see ``plot_overlay``."""
    image_volume = as_volume(image, name="image")
    label_volume = as_volume(labels, name="labels")
    _same_shape(image, "labels", labels, "pass the labels computed from this image.")
    _check_labels_dtype(label_volume)
    window = check_window(window, label_volume.shape[-2:])
    plane = check_plane(plane, label_volume, lambda: busiest_plane(label_volume))
    title = f"{where(label_volume, plane)}: "
    extent = limits = None
    n_rows, n_cols = label_volume.shape[1:]
    step = -(-max(n_rows, n_cols) // OVERVIEW_PIXELS)
    if window is None and step == 1:
        ids = label_volume.read(plane, plane + 1)[0].astype(np.int64)
        shown = grey(image_volume.read(plane, plane + 1)[0])
        rgb = colour_labels(ids, shown, alpha)
        # As mark_boundaries(rgb, ids, color=(1, 1, 0), mode="outer").
        rgb[outer_boundaries(ids)] = (1.0, 1.0, 0.0)
        title += _particles(ids)
    elif window is None:
        # Too large to show whole at full resolution: reduced, read band by band.
        scan = _PlaneScan(image_volume, label_volume, plane, step=step).run()
        rgb = colour_labels(scan.ids, scan.shade(scan.mean), alpha, palette_labels=scan.labels)
        rgb[outer_boundaries(scan.ids)] = (1.0, 1.0, 0.0)
        # Each shown pixel covers its block of the plane's pixels.
        extent = (-0.5, rgb.shape[1] * step - 0.5, rgb.shape[0] * step - 0.5, -0.5)
        limits = ((-0.5, n_cols - 0.5), (n_rows - 0.5, -0.5))
        title += f"{_count(scan.labels.size)}, shown {step}x reduced"
    else:
        size = window if isinstance(window, int) else None
        scan = _PlaneScan(image_volume, label_volume, plane, size=size).run()
        rows, cols = scan.window if size is not None else window
        rgb, ids = _window_overlay(image_volume, label_volume, plane, scan, alpha, rows, cols)
        # Axes in the plane's own pixel coordinates, not the window's.
        extent = (cols.start - 0.5, cols.stop - 0.5, rows.stop - 0.5, rows.start - 0.5)
        title += f"rows {rows.start}-{rows.stop - 1}, columns {cols.start}-{cols.stop - 1}, {_particles(ids)}"
    ax = new_axes(ax)
    ax.imshow(rgb, interpolation="nearest", extent=extent)
    if limits is not None:
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
    ax.set_title(title)
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
    n_rows, n_cols = image_volume.shape[1:]
    step = -(-max(n_rows, n_cols) // OVERVIEW_PIXELS)
    reduced = ""
    if step == 1:
        shown = grey(np.asarray(image_volume.read(plane, plane + 1)[0]))
        values = np.asarray(probability_volume.read(plane, plane + 1)[0], dtype=np.float32)
        ids = None if label_volume is None else np.asarray(label_volume.read(plane, plane + 1)[0]).astype(np.int64)
        particles = None if ids is None else _particles(ids)
    else:
        # Too large to show whole at full resolution: reduced, read band by
        # band, each block as its mean intensity, its largest probability
        # and its largest label (so that no particle vanishes).
        scan = _PlaneScan(image_volume, label_volume, plane, step=step, probability_volume=probability_volume).run()
        shown, values, ids = scan.shade(scan.mean), scan.probability, getattr(scan, "ids", None)
        particles = _count(scan.labels.size)
        reduced = f", shown {step}x reduced"
    axes[0].imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[0].set_title(where(image_volume, plane) + reduced)
    mapped = axes[1].imshow(values, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[1].set_title("particle probability" + (" (block maxima)" if reduced else ""))
    axes[1].figure.colorbar(mapped, ax=axes[1], shrink=0.8)
    if ids is not None:
        outlined = np.dstack([shown] * 3).astype(np.float64)
        outlined[outer_boundaries(ids)] = (1.0, 1.0, 0.0)  # as mark_boundaries(..., mode="outer")
        axes[2].imshow(outlined, interpolation="nearest")
        axes[2].set_title(particles)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return axes
