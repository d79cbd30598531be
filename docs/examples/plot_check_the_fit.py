"""
Check the fitted mixture
========================

Before trusting the particles, look at what the mixture learned: the stack,
background and particle intensity distributions with the seed and exclusion
thresholds, and each slice's particle weight along Z, which shows brightness
drift through the stack.
"""

import matplotlib.pyplot as plt

from nanoseg import NanoparticleMixture
from nanoseg.datasets import make_phantom
from nanoseg.plotting import plot_mixture, plot_slice_weights

image, mask = make_phantom((24, 192, 192), drift=3.0, random_state=1)
mixture = NanoparticleMixture(max_iter=100_000).fit(image)

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
plot_mixture(mixture, ax=axes[0])
plot_slice_weights(mixture, image, ax=axes[1])
fig.tight_layout()
