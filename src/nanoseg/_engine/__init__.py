"""Orchestration: how estimators walk volumes slab by slab, in memory or as lazy dask graphs."""
