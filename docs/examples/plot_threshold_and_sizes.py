"""
Threshold sensitivity and particle sizes
========================================

How many particles, and how much particle volume, does each posterior
threshold give? A plateau means the count does not hinge on the exact
threshold. The particle table then gives sizes in nanometres, from the
voxel size (50 x 10 x 10 nm here).
"""

import matplotlib.pyplot as plt

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_phantom
from nanoseg.measure import particle_table
from nanoseg.plotting import plot_size_distribution, plot_threshold_sensitivity

spacing = (50.0, 10.0, 10.0)
image, mask = make_phantom((24, 192, 192), spacing=spacing, random_state=2)
posterior = NanoparticleMixture(max_iter=100_000).fit(image).predict_proba(image)
labels = NanoparticleLabeler().transform(posterior)
table = particle_table(labels, spacing=spacing, posterior=posterior)
print(table[["volume", "equivalent_diameter", "mean_posterior"]].describe().round(2))

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
plot_threshold_sensitivity(posterior, ax=axes[0])
plot_size_distribution(table, ax=axes[1])
fig.tight_layout()
