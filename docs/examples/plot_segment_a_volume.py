"""
Segment a volume and look at the result
=======================================

The whole chain on a synthetic SBF-SEM-like phantom: fit the intensity
mixture, compute the posterior, label the particles, and overlay them on the
slice that holds the most particle voxels.
"""

import matplotlib.pyplot as plt
from sklearn.pipeline import Pipeline

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_phantom
from nanoseg.metrics import match_objects
from nanoseg.plotting import plot_overlay

image, mask, truth = make_phantom((24, 192, 192), random_state=0, return_labels=True)
pipeline = Pipeline([
    ("mixture", NanoparticleMixture(max_iter=100_000)),
    ("labeler", NanoparticleLabeler()),
])
labels = pipeline.fit_transform(image)

scores = match_objects(labels, truth)
print(f"{labels.max()} particles found, {truth.max()} in the ground truth; "
      f"object F1 {scores['f1']:.2f} (IoU > 0.5)")

fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
plot_overlay(image, labels, ax=axes[0])
axes[0].set_title("found")
plot_overlay(image, truth, ax=axes[1])
axes[1].set_title("ground truth")
fig.tight_layout()
