"""The mixture's data-driven seed level (percentile_low="otsu"), its monotone
posterior (monotone_posterior=True) and its dilation halos (halo="dilation")."""

import json

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from nanoseg import NanoparticleLabeler, NanoparticleMixture, _model, persistence
from nanoseg.cli import main
from nanoseg.datasets import make_phantom

# -- the projection itself -----------------------------------------------------


def test_monotone_pmf_pools_a_hand_computed_case():
    # Equal background weights: the ratios (1.6, 0.4, 0.4, 1.6) break the
    # order at the first bin; pooling it with the next two gives their mean
    # 0.8, so the PMF is 0.8 * 0.25 on the first three bins, 1.6 * 0.25 on
    # the last.
    p_bg = np.full(4, 0.25)
    p_np = np.array([0.4, 0.1, 0.1, 0.4])
    out = _model.monotone_particle_pmf(p_np, p_bg)
    np.testing.assert_allclose(out, [0.2, 0.2, 0.2, 0.4])


def test_monotone_pmf_weights_the_pool_by_the_background():
    # Ratios (2, 0.5, 5/3): the first two break the order and pool to their
    # background-weighted mean (0.2 + 0.3) / (0.1 + 0.6) = 5/7, below 5/3.
    p_bg = np.array([0.1, 0.6, 0.3])
    p_np = np.array([0.2, 0.3, 0.5])
    out = _model.monotone_particle_pmf(p_np, p_bg)
    np.testing.assert_allclose(out, [0.5 / 7, 3 / 7, 0.5])


def test_monotone_pmf_keeps_an_already_monotone_pmf():
    v = np.arange(256)
    p_bg = _model.normalize_pmf(np.exp(-0.5 * ((v - 100) / 12.0) ** 2), 1e-12)
    # A particle PMF whose ratio to the background rises over the whole range.
    ratio = np.exp((v - 128) / 16.0)
    rising = _model.normalize_pmf(ratio * p_bg, 1e-12)
    out = _model.monotone_particle_pmf(rising, p_bg)
    # Equal up to the floor's rounding on bins of about 1e-12.
    np.testing.assert_allclose(out, rising, rtol=1e-9, atol=1e-11)
    assert out.sum() == pytest.approx(1.0)


def test_otsu_intensity_matches_scikit_image_on_the_voxels():
    rng = np.random.default_rng(0)
    image = np.concatenate([rng.normal(60, 8, 5000), rng.normal(170, 15, 800)]).clip(0, 255).astype(np.uint8)
    hist = np.bincount(image, minlength=256)
    assert _model.otsu_intensity(hist) == threshold_otsu(image)


# -- a volume whose background extraction misses the darkest pixels ------------


def _dark_rims(shape=(4, 160, 160), spacing=16, seed=0):
    """Background ~ N(100, 5) with bright 3x3 particles (200), each with a
    dark rim (value 30) one pixel wide: the rims lie inside the seeds' halos,
    so the background histogram never sees grey level 30."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 5, shape)
    truth = np.zeros(shape, bool)
    for z in range(shape[0]):
        for y in range(8, shape[1] - 8, spacing):
            for x in range(8, shape[2] - 8, spacing):
                image[z, y - 2 : y + 3, x - 2 : x + 3] = 30
                image[z, y - 1 : y + 2, x - 1 : x + 2] = 200
                truth[z, y - 1 : y + 2, x - 1 : x + 2] = True
    return image.clip(0, 255).astype(np.uint8), truth


def test_unconstrained_posterior_claims_the_dark_rims_and_the_monotone_one_does_not():
    image, truth = _dark_rims()
    settings = {"percentile_low": 95.0, "percentile_high": 99.0, "halo_pad": 3, "min_seed_size": 4}
    plain = NanoparticleMixture(**settings).fit(image)
    mono = NanoparticleMixture(monotone_posterior=True, **settings).fit(image)
    # The seed method's EM hands grey level 30 to the particles ...
    plain_post = plain.predict_proba(image)
    assert plain_post[image == 30].min() > 0.5
    # ... the monotone model pools it with the background's grey levels
    # (their mass-weighted ratio), so it gets as little as the background,
    # and keeps the particles.
    mono_post = mono.predict_proba(image)
    assert mono_post[image == 30].max() < 0.1
    assert mono_post[image == 30].max() <= mono_post[(image > 90) & (image < 110)].max() + 1e-6
    assert mono_post[truth].min() > 0.99
    labels = NanoparticleLabeler(threshold=0.5, radius=0, min_size=4).fit_transform(mono_post)
    np.testing.assert_array_equal(labels > 0, truth)


def test_monotone_posterior_never_decreases_where_background_was_seen():
    image, _ = make_phantom(shape=(6, 96, 96), random_state=3)
    mixture = NanoparticleMixture(monotone_posterior=True, percentile_low=97.0).fit(image)
    luts = mixture.posterior_luts(mixture.slice_weights(image)).astype(np.float64)
    # Bins the background never reached keep the floor of both PMFs (a
    # posterior of about half the slice weight there), as in the seed method.
    seen = np.flatnonzero(mixture.background_histogram_)
    assert np.all(np.diff(luts[:, seen], axis=1) >= -1e-7)
    plain = NanoparticleMixture(percentile_low=97.0).fit(image)
    plain_luts = plain.posterior_luts(plain.slice_weights(image)).astype(np.float64)
    assert np.any(np.diff(plain_luts[:, seen], axis=1) < -1e-3)  # the case is not trivial
    # The constrained PMF is a PMF.
    assert mixture.particle_pmf_.sum() == pytest.approx(1.0)


def test_monotone_posterior_off_is_the_seed_method():
    image, _ = make_phantom(shape=(4, 64, 64), random_state=1)
    default = NanoparticleMixture().fit(image)
    off = NanoparticleMixture(monotone_posterior=False).fit(image)
    np.testing.assert_array_equal(default.particle_pmf_, off.particle_pmf_)


# -- the Otsu seed level ---------------------------------------------------------


def test_otsu_seed_level_is_the_stack_histograms_otsu_threshold():
    image, _ = make_phantom(shape=(4, 96, 96), random_state=2)
    mixture = NanoparticleMixture(percentile_low="otsu").fit(image)
    assert mixture.low_intensity_ == threshold_otsu(image)
    assert mixture.high_intensity_ >= mixture.low_intensity_


def test_otsu_seed_level_for_dark_particles_is_mirrored():
    image, _ = make_phantom(shape=(4, 96, 96), random_state=2)
    bright = NanoparticleMixture(percentile_low="otsu").fit(image)
    dark = NanoparticleMixture(percentile_low="otsu", polarity="dark").fit(255 - image)
    assert dark.low_intensity_ == 255 - bright.low_intensity_
    np.testing.assert_array_equal(dark.predict_proba(255 - image), bright.predict_proba(image))


def test_otsu_seed_level_follows_dense_particles():
    # Particles on 30 % of the pixels: the 99.5th percentile lies inside the
    # particles' own intensities, the Otsu level between the two classes.
    rng = np.random.default_rng(4)
    image = rng.normal(80, 6, (2, 120, 120))
    truth = np.zeros(image.shape, bool)
    truth[:, :, :36] = True
    image[truth] = rng.normal(180, 6, int(truth.sum()))
    image = image.clip(0, 255).astype(np.uint8)
    mixture = NanoparticleMixture(percentile_low="otsu", halo_pad=2, monotone_posterior=True).fit(image)
    assert 100 < mixture.low_intensity_ < 160
    posterior = mixture.predict_proba(image)
    assert ((posterior >= 0.5) == truth).mean() > 0.999


def test_otsu_seed_level_refuses_saturated_data():
    rng = np.random.default_rng(5)
    image = rng.normal(90, 8, (2, 64, 64)).clip(0, 255).astype(np.uint8)
    image[:, :, :40] = 255  # 62 % of the voxels at the brightest value
    with pytest.raises(ValueError, match="saturated"):
        NanoparticleMixture(percentile_low="otsu").fit(image)


def test_otsu_seed_level_ignores_percentile_order_and_other_names_are_refused():
    image, _ = make_phantom(shape=(2, 64, 64), random_state=0)
    NanoparticleMixture(percentile_low="otsu", percentile_high=50.0).fit(image)
    with pytest.raises(ValueError, match="percentile_low"):
        NanoparticleMixture(percentile_low="li").fit(image)
    with pytest.raises(ValueError, match="monotone_posterior"):
        NanoparticleMixture(monotone_posterior="yes").fit(image)


# -- persistence and the command line ----------------------------------------------


def test_new_options_survive_saving(tmp_path):
    image, _ = make_phantom(shape=(4, 64, 64), random_state=6)
    mixture = NanoparticleMixture(percentile_low="otsu", monotone_posterior=True).fit(image)
    persistence.save(mixture, tmp_path / "model.npz")
    loaded = persistence.load(tmp_path / "model.npz")
    assert loaded.get_params()["percentile_low"] == "otsu"
    assert loaded.get_params()["monotone_posterior"] is True
    np.testing.assert_array_equal(loaded.predict_proba(image), mixture.predict_proba(image))


def test_cli_takes_otsu_monotone_and_dilation(tmp_path):
    import tifffile

    image, _ = make_phantom(shape=(4, 64, 64), random_state=7)
    tifffile.imwrite(tmp_path / "image.tif", image, photometric="minisblack")
    code = main([
        "fit", str(tmp_path / "image.tif"), str(tmp_path / "model.npz"),
        "--percentile-low", "otsu", "--monotone-posterior", "--halo", "dilation", "--max-iter", "100000", "--spacing", "50", "10", "10", "-q",
    ])
    assert code == 0
    loaded = persistence.load(tmp_path / "model.npz")
    expected = NanoparticleMixture(
        percentile_low="otsu", monotone_posterior=True, halo="dilation", max_iter=100000
    ).fit(image)
    assert loaded.get_params()["halo"] == "dilation"
    assert loaded.low_intensity_ == expected.low_intensity_
    np.testing.assert_array_equal(loaded.particle_pmf_, expected.particle_pmf_)
    assert json.dumps(loaded.get_params()["percentile_low"]) == '"otsu"'


# -- halos around the seeds themselves ---------------------------------------------


def _chebyshev_band(seed_points, shape, pad):
    """Pixels within `pad` rows and columns of any of `seed_points`, by brute force."""
    rows, cols = np.indices(shape)
    band = np.zeros(shape, bool)
    for r, c in seed_points:
        band |= (np.abs(rows - r) <= pad) & (np.abs(cols - c) <= pad)
    return band


def test_dilation_halo_excludes_the_band_around_a_diagonal_seed():
    rng = np.random.default_rng(8)
    image = rng.integers(40, 60, (1, 90, 90)).astype(np.uint8)
    line = [(k, k) for k in range(10, 70)]
    for r, c in line:
        image[0, r, c] = 200
    settings = {"percentile_low": 99.0, "percentile_high": 99.9, "halo_pad": 3, "min_seed_size": 5}
    dilation = NanoparticleMixture(halo="dilation", **settings).fit(image)
    box = NanoparticleMixture(**settings).fit(image)
    band = _chebyshev_band(line, image.shape[1:], 3)
    expected = np.bincount(image[0][~band], minlength=256)
    np.testing.assert_array_equal(dilation.background_histogram_, expected)
    # The box halo takes the whole square the diagonal spans (rows and
    # columns 7 to 72).
    square = np.zeros(image.shape[1:], bool)
    square[7:73, 7:73] = True
    np.testing.assert_array_equal(box.background_histogram_, np.bincount(image[0][~square], minlength=256))


@pytest.mark.parametrize("halo_pad", [0, 3])
def test_dilation_halo_without_size_filter_or_padding(halo_pad):
    # min_seed_size=1 keeps every seed pixel without labelling them, and
    # halo_pad=0 excludes the seeds alone; the Otsu level puts the seeds
    # exactly on the line.
    rng = np.random.default_rng(13)
    image = rng.integers(40, 60, (1, 60, 60)).astype(np.uint8)
    line = [(k, 59 - k) for k in range(5, 50)]
    for r, c in line:
        image[0, r, c] = 200
    mixture = NanoparticleMixture(
        percentile_low="otsu", halo="dilation", halo_pad=halo_pad, min_seed_size=1
    ).fit(image)
    band = _chebyshev_band(line, image.shape[1:], halo_pad)
    np.testing.assert_array_equal(mixture.background_histogram_, np.bincount(image[0][~band], minlength=256))


def test_dilation_halo_of_a_lone_compact_seed_is_its_box():
    rng = np.random.default_rng(9)
    image = rng.integers(40, 60, (2, 64, 64)).astype(np.uint8)
    image[:, 20:26, 30:36] = 220  # a square seed: its grown box is its dilation
    settings = {"percentile_low": 99.0, "percentile_high": 99.9, "halo_pad": 4, "min_seed_size": 5}
    box = NanoparticleMixture(**settings).fit(image)
    dilation = NanoparticleMixture(halo="dilation", **settings).fit(image)
    np.testing.assert_array_equal(box.background_histogram_, dilation.background_histogram_)


def test_dilation_halo_keeps_background_between_touching_particles():
    # A lattice of bright lines joins every particle into one component whose
    # bounding box is the whole image: the box halo leaves no background.
    rng = np.random.default_rng(10)
    image = rng.normal(60, 4, (2, 96, 96))
    image[:, ::12, :] = 200
    image[:, :, ::12] = 200
    image = image.clip(0, 255).astype(np.uint8)
    settings = {"percentile_low": "otsu", "halo_pad": 2, "min_seed_size": 5}
    with pytest.raises(ValueError, match="No background voxels"):
        NanoparticleMixture(**settings).fit(image)
    mixture = NanoparticleMixture(halo="dilation", **settings).fit(image)
    band = _chebyshev_band([(r, c) for r in range(96) for c in range(96) if r % 12 == 0 or c % 12 == 0], (96, 96), 2)
    assert mixture.background_histogram_.sum() == 2 * int((~band).sum())
    assert (mixture.predict_proba(image)[image == 200] > 0.99).all()


@pytest.mark.parametrize("option", ["monotone_posterior", "dilation_halo"])
def test_dark_particles_give_the_mirror_image(option):
    if option == "monotone_posterior":
        image, _ = _dark_rims()
        settings = {"percentile_low": 95.0, "percentile_high": 99.0, "halo_pad": 3, "min_seed_size": 4,
                    "monotone_posterior": True}
        fitted = "particle_pmf_"
    else:
        image, _ = make_phantom(shape=(3, 80, 80), random_state=12)
        settings = {"halo": "dilation", "halo_pad": 4, "min_seed_size": 3, "max_iter": 100_000}
        fitted = "background_histogram_"
    bright = NanoparticleMixture(**settings).fit(image)
    dark = NanoparticleMixture(polarity="dark", **settings).fit(255 - image)
    np.testing.assert_array_equal(getattr(dark, fitted), getattr(bright, fitted)[::-1])
    np.testing.assert_array_equal(dark.predict_proba(255 - image), bright.predict_proba(image))


def test_halo_shape_is_validated():
    image, _ = make_phantom(shape=(2, 48, 48), random_state=0)
    with pytest.raises(ValueError, match="halo"):
        NanoparticleMixture(halo="circle").fit(image)
