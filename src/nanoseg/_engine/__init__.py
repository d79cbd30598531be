"""Orchestration: how estimators walk volumes slab by slab, in memory or as lazy dask graphs.

``fit`` and ``posterior`` run the mixture, ``labeling`` the labeler,
``classify`` the learned classifier, and ``overlap`` maps a function over
overlapping blocks for the steps that need neighbours. Kernels on voxels
live in :mod:`nanoseg._ops`.
"""
