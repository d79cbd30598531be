"""Gaussian smoothing evaluated at chosen voxels only, equal to the dense filter there.

The classifier describes only the voxels its gate lets through -- well under
1 % of a crop on typical volumes -- yet a dense Gaussian filters every voxel
of the crop. SciPy's :func:`~scipy.ndimage.gaussian_filter` is separable: it
filters along Z, then Y, then X, each pass writing float32. Here the X pass
is computed only at the chosen voxels, the Y pass only on the (z, y) rows
that hold one, and the Z pass only on the rows the Y pass reads; within a
row, both only on the tiles of :data:`TILE_COLUMNS` columns that the next
pass reads (the chosen voxels of a gated crop sit in small clusters, so
that most of a row is never read). Each pass
repeats SciPy's arithmetic exactly -- the line converted to float64, ``x[c] * w[0]`` plus ``(x[c - j] + x[c + j]) *
w[j]`` for ``j`` from the radius down to 1, rounded to float32, with
``mode="reflect"`` at the crop's edges -- so the values are identical, bit
for bit, to the dense filter's (the tests compare them).
"""

from __future__ import annotations

import functools

import numpy as np

from . import _numba

#: Use the sparse evaluation when the rows holding chosen voxels are at most
#: this fraction of the crop's (otherwise the dense filter is as fast).
MAX_ROW_FRACTION = 0.5

#: Width of the column tiles by which the row passes skip what is not read.
TILE_COLUMNS = 32


def gaussian_weights(sigma, truncate):
    """SciPy's Gaussian kernel for `sigma` and `truncate`: (2r + 1,) float64, symmetric."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x**2)
    return phi / phi.sum()


def _k_reflect(i, n):
    # scipy.ndimage's mode="reflect" ("d c b a | a b c d") for any distance.
    period = 2 * n
    i = i % period
    if i < 0:
        i += period
    if i >= n:
        i = period - 1 - i
    return i


def _k_row(index, z, y, n_y):
    # Row of `source` holding the crop's row (z, y): through the table
    # `index`, or z * n_y + y when there is none (numba drops the other branch).
    if index is None:
        return z * n_y + y
    return index[z, y]


def _k_rows_pass(source, rows_z, rows_y, along_z, n_z, n_y, index, weights, tiles, tile, square, out):
    """One pass across rows: out[k, :] = the filter, along Z (`along_z`) or Y, of the rows
    of `source` (R, X float32) around the crop's row (rows_z[k], rows_y[k]), reflected at
    the crop's faces; the crop's row (z, y) is row :func:`_k_row` of `source`. Only the
    columns of the tiles marked in tiles[k] (`tile` columns each) are computed. With
    `square`, each value of `source` is squared (in float32) as it is read."""
    n_x = source.shape[1]
    n_tiles = tiles.shape[1]
    radius = (weights.size - 1) // 2
    line = np.empty(n_x, dtype=np.float64)
    before = np.empty(radius + 1, dtype=np.int64)
    after = np.empty(radius + 1, dtype=np.int64)
    for k in range(rows_z.size):
        z = rows_z[k]
        y = rows_y[k]
        c = _k_row(index, z, y, n_y)
        for j in range(1, radius + 1):
            if along_z:
                before[j] = _k_row(index, _k_reflect(z - j, n_z), y, n_y)
                after[j] = _k_row(index, _k_reflect(z + j, n_z), y, n_y)
            else:
                before[j] = _k_row(index, z, _k_reflect(y - j, n_y), n_y)
                after[j] = _k_row(index, z, _k_reflect(y + j, n_y), n_y)
        t = 0
        while t < n_tiles:
            if not tiles[k, t]:
                t += 1
                continue
            start = t
            while t < n_tiles and tiles[k, t]:
                t += 1
            x0 = start * tile
            x1 = min(t * tile, n_x)
            # Unsigned indices: numba then drops its negative-index
            # wrap-around, and the loops vectorise (several times faster).
            for i in range(x0, x1):
                x = np.uintp(i)
                v = source[c, x]
                if square:
                    v = v * v
                line[x] = np.float64(v) * weights[radius]
            for j in range(radius, 0, -1):
                b = before[j]
                a = after[j]
                w = weights[radius - j]
                for i in range(x0, x1):
                    x = np.uintp(i)
                    vb = source[b, x]
                    va = source[a, x]
                    if square:
                        vb = vb * vb
                        va = va * va
                    line[x] += (np.float64(vb) + np.float64(va)) * w
            for i in range(x0, x1):
                x = np.uintp(i)
                out[k, x] = np.float32(line[x])
    return out


def _k_mark_tiles(row_of, cols, radius, tile, n_x, out):
    # out[r, t]: a chosen voxel of row r reads column tile t within `radius`
    # columns (reflected columns lie within it too).
    for k in range(row_of.size):
        first = max(cols[k] - radius, 0) // tile
        last = min(cols[k] + radius, n_x - 1) // tile
        for t in range(first, last + 1):
            out[row_of[k], t] = True
    return out


def _k_spread_tiles(rows_z, rows_y, tiles, radius, n_y, index, out):
    # out[index[z, y']] |= tiles[k] for every row (z, y') that the Y pass at
    # the chosen row k = (z, y) reads (y' = y + j, j within `radius`, reflected).
    for k in range(rows_z.size):
        z = rows_z[k]
        y = rows_y[k]
        for j in range(-radius, radius + 1):
            b = index[z, _k_reflect(y + j, n_y)]
            for t in range(tiles.shape[1]):
                if tiles[k, t]:
                    out[b, t] = True
    return out


def _k_points_pass(rows, row_of, cols, weights, out):
    """X pass at the points (row_of[k], cols[k]) of the filtered `rows` (R, X float32): out[k]."""
    n_x = rows.shape[1]
    radius = (weights.size - 1) // 2
    for k in range(row_of.size):
        r = row_of[k]
        c = cols[k]
        total = np.float64(rows[r, c]) * weights[radius]
        if radius <= c < n_x - radius:
            # Away from the row's ends (most points): no reflection to work out.
            for j in range(radius, 0, -1):
                total += (np.float64(rows[r, c - j]) + np.float64(rows[r, c + j])) * weights[radius - j]
        else:
            for j in range(radius, 0, -1):
                total += (
                    np.float64(rows[r, _k_reflect(c - j, n_x)]) + np.float64(rows[r, _k_reflect(c + j, n_x)])
                ) * weights[radius - j]
        out[k] = np.float32(total)
    return out


@functools.cache
def _compiled():
    return _numba.compile_into(globals(), ("_k_reflect", "_k_row", "_k_rows_pass", "_k_mark_tiles", "_k_spread_tiles", "_k_points_pass"))


def available():
    """True when the compiled passes can be used."""
    return _numba.available()


def _reflect(index, n):
    """NumPy version of :func:`_k_reflect` for arrays of indices."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


class Points:
    """Chosen voxels of a (Z, Y, X) crop, grouped by row for the passes of :func:`gaussian_at`.

    Built once per crop and shared by all its Gaussians (the rows each pass
    reads depend only on the voxels and the Y radius).
    """

    def __init__(self, shape, flat):
        self.shape = tuple(int(n) for n in shape)
        self.flat = np.asarray(flat, dtype=np.int64)
        n_y, n_x = self.shape[1], self.shape[2]
        rows = self.flat // n_x
        if rows.size and np.all(rows[1:] >= rows[:-1]):
            # Sorted voxels (the usual case): rows are runs, no hashing needed.
            starts = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))
            self.row_ids = rows[starts]
            self.row_of = np.cumsum(np.concatenate(([False], rows[1:] != rows[:-1]))).astype(np.int64)
        else:
            self.row_ids, row_of = np.unique(rows, return_inverse=True)
            self.row_of = row_of.astype(np.int64).reshape(-1)
        self.rows_z, self.rows_y = np.divmod(self.row_ids, n_y)
        self.cols = self.flat % n_x
        self._bands = {}
        self._tiles = {}
        self._band_tiles = {}

    @property
    def row_fraction(self):
        """Fraction of the crop's voxels on the rows that hold chosen voxels."""
        return self.row_ids.size * self.shape[2] / float(np.prod(self.shape))

    def band(self, radius):
        """(z, y) of every row within `radius` rows (reflected) of a chosen row, and their table."""
        if radius not in self._bands:
            n_z, n_y = self.shape[0], self.shape[1]
            reach = _reflect(self.rows_y[:, None] + np.arange(-radius, radius + 1)[None, :], n_y)
            # A table of the crop's rows (small: Z x Y) rather than a unique.
            marked = np.zeros((n_z, n_y), dtype=bool)
            marked[np.broadcast_to(self.rows_z[:, None], reach.shape), reach] = True
            band_z, band_y = np.nonzero(marked)
            index = np.zeros((n_z, n_y), dtype=np.int64)
            index[band_z, band_y] = np.arange(band_z.size)
            self._bands[radius] = (band_z, band_y, index)
        return self._bands[radius]

    def tiles(self, x_radius):
        """Column tiles each chosen row reads within `x_radius` columns: (rows, tiles) bool."""
        if x_radius not in self._tiles:
            n_x = self.shape[2]
            out = np.zeros((self.row_ids.size, -(-n_x // TILE_COLUMNS)), dtype=bool)
            self._tiles[x_radius] = _compiled()["_k_mark_tiles"](self.row_of, self.cols, x_radius, TILE_COLUMNS, n_x, out)
        return self._tiles[x_radius]

    def band_tiles(self, y_radius, x_radius):
        """Column tiles each row of ``band(y_radius)`` is read at by the rows within `y_radius` of it."""
        key = (y_radius, x_radius)
        if key not in self._band_tiles:
            band_z, _, index = self.band(y_radius)
            tiles = self.tiles(x_radius)
            out = np.zeros((band_z.size, tiles.shape[1]), dtype=bool)
            self._band_tiles[key] = _compiled()["_k_spread_tiles"](
                self.rows_z, self.rows_y, tiles, y_radius, self.shape[1], index, out
            )
        return self._band_tiles[key]


def gaussian_at(image, sigma, points, truncate, square=False):
    """``scipy.ndimage.gaussian_filter(image, sigma, mode="reflect", truncate=truncate)``
    at the chosen voxels `points` (a :class:`Points`) of the C-ordered float32
    (Z, Y, X) `image`: (n,) float32, in the order of ``points.flat``. With
    `square`, the filter of ``image * image`` (squared as the first pass reads
    it, so that no squared copy of the image is made).
    """
    kernels = _compiled()
    image = np.ascontiguousarray(image, dtype=np.float32)
    n_z, n_y, n_x = image.shape
    weights = [None if float(s) <= 1e-15 else gaussian_weights(float(s), truncate)[::-1].copy() for s in sigma]
    radii = [0 if w is None else (w.size - 1) // 2 for w in weights]
    # The rows the Y pass reads (the chosen rows themselves when there is no Y
    # pass), and the column tiles each pass computes on each of its rows.
    row_tiles = points.tiles(radii[2])
    if weights[1] is not None:
        band_z, band_y, index = points.band(radii[1])
        band_tiles = points.band_tiles(radii[1], radii[2])
    else:
        band_z, band_y, index, band_tiles = points.rows_z, points.rows_y, None, row_tiles
    if weights[0] is not None:
        # Along Z: the image's rows (z, y) as rows z * Y + y of a 2D array.
        filtered = kernels["_k_rows_pass"](
            image.reshape(-1, n_x), band_z, band_y, True, n_z, n_y, None, weights[0], band_tiles,
            TILE_COLUMNS, square, np.empty((band_z.size, n_x), np.float32),
        )
    else:
        filtered = image[band_z, band_y]
        if square:
            filtered = filtered * filtered
    if weights[1] is not None:
        # Along Y: rows of `filtered`, found through the band's table.
        rows = kernels["_k_rows_pass"](
            filtered, points.rows_z, points.rows_y, False, n_z, n_y, index, weights[1], row_tiles,
            TILE_COLUMNS, False, np.empty((points.row_ids.size, n_x), np.float32),
        )
    else:
        rows = filtered
    if weights[2] is not None:
        return kernels["_k_points_pass"](rows, points.row_of, points.cols, weights[2], np.empty(points.flat.size, np.float32))
    return rows[points.row_of, points.cols]
