"""
Learn particles from annotations
================================

When some particles have been annotated, :class:`~nanoseg.NanoparticleClassifier`
learns what sets them apart from the background in multi-scale local
features of the image, and gives every voxel a particle probability that
:class:`~nanoseg.NanoparticleLabeler` turns into particles. Here it learns
from the first half of a phantom volume, whose exact instance labels stand
in for hand annotations, and segments the second half.
"""

import matplotlib.pyplot as plt
import numpy as np

from nanoseg import NanoparticleClassifier, NanoparticleLabeler
from nanoseg.datasets import make_phantom
from nanoseg.metrics import match_objects
from nanoseg.plotting import plot_feature_importances, plot_features, plot_probability

spacing = (50.0, 10.0, 10.0)  # nm per voxel along z, y, x
image, mask, truth = make_phantom(
    (32, 192, 192), n_particles=240, spacing=spacing, random_state=0, return_labels=True
)
train, test = slice(0, 16), slice(16, 32)

# Scales in nm: 10 nm is one voxel in-plane and a fifth of a voxel along z.
classifier = NanoparticleClassifier(spacing=spacing, sigmas=(10, 20, 40), random_state=0)
classifier.fit(image[train], truth[train])
print(f"{classifier.n_features_} features; the gate lets through "
      f"{classifier.gate_recall_:.1%} of the annotated particle voxels and "
      f"{classifier.gate_fraction_:.1%} of all voxels")

probability = classifier.predict_proba(image[test])
labels = NanoparticleLabeler(threshold=0.5, radius=0, min_size=4).transform(probability)
scores = match_objects(labels, truth[test])
print(f"{labels.max()} particles found in the held-out half, {len(np.unique(truth[test])) - 1} "
      f"annotated; object F1 {scores['f1']:.2f} (IoU > 0.5)")

# %%
# What the classifier sees
# ------------------------
#
# One feature per family at the middle scale: the intensity, smoothed, as a
# difference of Gaussians (blob contrast), its gradient, the largest
# eigenvalue of its Hessian (negative inside bright blobs) and the local
# contrast, on the held-out plane with the most particle voxels.

z = int(np.argmax(mask[test].sum(axis=(1, 2))))
plot_features(classifier, image[test], plane=z)

# %%
# Probability and particles
# -------------------------
#
# The image, the particle probability and the particles found, outlined on
# the image. Voxels outside the gate, and the borders the classifier learned
# between touching particles, have probability 0.

plot_probability(image[test], probability, labels, plane=z)

# %%
# Which features matter
# ---------------------
#
# The forest's impurity-based importances: a rough guide to which filters
# and scales separate these particles from this background.

fig, ax = plt.subplots(figsize=(6, 6), layout="constrained")
plot_feature_importances(classifier, ax=ax, max_features=12)
