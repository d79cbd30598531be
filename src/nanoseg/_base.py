"""Behaviour shared by the nanoseg estimators."""

from __future__ import annotations


class VolumeEstimatorMixin:
    """scikit-learn tags for estimators on images and volumes.

    Inputs are 2D images or 3D volumes (not feature matrices) and no target
    is needed. Place it left of ``BaseEstimator``.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.target_tags.required = False
        tags.transformer_tags.preserves_dtype = []
        return tags


def map_volumes(function, volumes, is_list):
    """Apply `function` to each volume; a list for a list input, else one result."""
    results = [function(volume) for volume in volumes]
    return results if is_list else results[0]
