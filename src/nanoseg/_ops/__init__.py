"""Kernels, one module per concept, each with its NumPy and CuPy variants behind one call.

A kernel takes a :class:`nanoseg._backend.Backend` (the array namespace and
its ``ndimage``) and arrays of that backend, so the same code runs on the CPU
and, through CuPy, on a GPU.
"""
