"""Numbering components merged across slab faces (nanoseg._engine.merge)."""

import numpy as np
import pytest

from nanoseg._engine.merge import ComponentMerger


def reference_labels(counts, sizes, pairs, min_size):
    """Final label of every global id, by a plain union-find over all components."""
    n = sum(counts)
    parent = list(range(n + 1))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        parent[max(ra, rb)] = min(ra, rb)
    total = {}
    for gid in range(1, n + 1):
        total[find(gid)] = total.get(find(gid), 0) + int(sizes[gid - 1])
    roots = sorted(r for r, s in total.items() if s >= min_size)  # a root is its group's smallest id
    number = {r: k + 1 for k, r in enumerate(roots)}
    return np.array([0] + [number.get(find(g), 0) for g in range(1, n + 1)]), sum(total[r] for r in roots)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("min_size", [1, 4, 30])
def test_merged_labels_equal_a_union_find_over_every_component(seed, min_size):
    rng = np.random.default_rng(seed)
    counts = [int(c) for c in rng.integers(0, 25, size=rng.integers(1, 7))]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    sizes = rng.integers(1, 12, size=sum(counts))
    merger = ComponentMerger(min_size)
    all_pairs = []
    for i, (offset, count) in enumerate(zip(offsets, counts)):
        below = None
        if i and counts[i - 1] and count:
            n_pairs = rng.integers(0, 8)
            lower = offsets[i - 1] + rng.integers(1, counts[i - 1] + 1, n_pairs)
            upper = offset + rng.integers(1, count + 1, n_pairs)
            below = np.unique(np.stack([lower, upper], axis=1), axis=0).reshape(-1, 2)
            all_pairs += below.tolist()
        merger.add_slab(offset, sizes[offset : offset + count], below)
    merged = merger.merge()
    expected, n_voxels = reference_labels(counts, sizes, all_pairs, min_size)
    assert merged.n_labels == expected.max() and merged.n_voxels == n_voxels
    assert merged.n_pairs == len(all_pairs)
    for (offset, count), (local, labels) in zip(zip(offsets, counts), merged.labelled):
        lookup = np.zeros(count + 1, dtype=merged.dtype)
        lookup[local] = labels
        np.testing.assert_array_equal(lookup[1:], expected[offset + 1 : offset + count + 1])
        assert np.all(labels > 0) and np.all(np.diff(local) > 0)


def test_only_open_and_kept_components_are_retained():
    # Many specks under the minimum size, touching no face: none is kept.
    merger = ComponentMerger(min_size=6)
    merger.add_slab(0, np.array([1] * 1000 + [9, 2]))
    merger.add_slab(1002, np.array([1] * 1000 + [3]), below=np.array([[1002, 2003]]))
    merged = merger.merge()
    assert merged.n_open == 2  # the two components that touch across the face
    retained = sum(len(ids) for ids in merger._open_ids + merger._closed_ids)
    assert retained == 3  # and the closed one of 9 voxels
    assert merged.n_labels == 1 and merged.n_voxels == 9  # 2 + 3 voxels merged stay below 6
    assert [local.tolist() for local, _ in merged.labelled] == [[1001], []]


def test_no_slab_and_no_component():
    assert ComponentMerger(1).merge().n_labels == 0
    merger = ComponentMerger(1)
    merger.add_slab(0, np.zeros(0, dtype=np.int64))
    merger.add_slab(0, np.zeros(0, dtype=np.int64), below=np.empty((0, 2), dtype=np.int64))
    merged = merger.merge()
    assert merged.n_labels == 0 and [len(local) for local, _ in merged.labelled] == [0, 0]
