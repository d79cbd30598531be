"""What a new user meets first: the output API, colour images and voxel-size units."""

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from nanoseg import NanoparticleClassifier, NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_phantom
from nanoseg.io import check_spacing


@pytest.mark.parametrize("estimator", [NanoparticleMixture(), NanoparticleLabeler(), NanoparticleClassifier()])
def test_set_output_default_is_accepted_and_tables_refused(estimator):
    assert estimator.set_output(transform="default") is estimator
    assert estimator.set_output() is estimator
    with pytest.raises(ValueError, match="no table form"):
        estimator.set_output(transform="pandas")


def test_pipeline_set_output_default_keeps_working():
    volume, _ = make_phantom((8, 64, 64), n_particles=10, random_state=0)
    pipeline = Pipeline([("mixture", NanoparticleMixture(n_jobs=1, tol=1e-6)), ("labeler", NanoparticleLabeler(n_jobs=1))])
    pipeline.set_output(transform="default")
    labels = pipeline.fit_transform(volume)
    assert labels.shape == volume.shape and labels.max() > 0
    with pytest.raises(ValueError, match="no table form"):
        pipeline.set_output(transform="pandas")


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_images_are_refused_with_the_recipe(channels):
    image, mask = make_phantom((64, 64), n_particles=5, random_state=0)
    rgb = np.repeat(image[..., None], channels, axis=-1)
    with pytest.raises(ValueError, match="RGB.*rgb2gray"):
        NanoparticleMixture().fit(rgb)
    with pytest.raises(ValueError, match="RGB"):
        NanoparticleClassifier().fit(rgb, np.repeat(mask[..., None], channels, axis=-1))


def test_thin_volumes_with_many_planes_are_not_mistaken_for_colour():
    volume, _ = make_phantom((3, 64, 64), n_particles=5, random_state=0)
    NanoparticleMixture(n_jobs=1, tol=1e-6).fit(volume)  # (3, Y, X): three planes, fine


@pytest.mark.parametrize("spacing, unit", [((0.05, 0.01, 0.01), "micrometres"), ((5e4, 1e4, 2e4), "check the unit")])
def test_spacing_in_the_wrong_unit_warns(spacing, unit):
    with pytest.warns(UserWarning, match=unit):
        assert check_spacing(spacing) == spacing


def test_plausible_spacing_is_silent():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_spacing((50, 10, 10)) == (50.0, 10.0, 10.0)


def test_pooled_fit_over_crops_of_different_brightness_warns():
    from nanoseg.mixture import DegenerateFitWarning

    crops = []
    for seed, offset in enumerate((0, 0, 0, 110)):
        image, _ = make_phantom((96, 96), n_particles=6, random_state=seed)
        crops.append(np.clip(image.astype(int) + offset, 0, 255).astype(np.uint8))
    # The bright crop's background fills the top percentiles: seed = exclusion level.
    with pytest.warns(DegenerateFitWarning, match="PerVolume"):
        mixture = NanoparticleMixture(n_jobs=1).fit(crops)
    assert mixture.low_intensity_ == mixture.high_intensity_


def test_a_sound_fit_does_not_warn():
    import warnings

    volume, _ = make_phantom((8, 96, 96), n_particles=20, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NanoparticleMixture(n_jobs=1, tol=1e-6).fit(volume)
