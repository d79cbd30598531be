"""NanoparticleClassifier: learning from annotations, exact slab processing, bad input."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.measure import label as skimage_label
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from sklearn.utils._param_validation import InvalidParameterError

from nanoseg import NanoparticleClassifier, NanoparticleLabeler, NanoparticleMixture
from nanoseg import _annotations
from nanoseg._ops.filters import FeatureSpec, compute_features, support
from nanoseg.datasets import make_phantom
from nanoseg.metrics import make_object_scorer, match_objects
from test_device import fake_gpu  # noqa: F401  (the stand-in GPU fixture)

SPACING = (50.0, 10.0, 10.0)


@pytest.fixture(scope="module")
def fitted(phantom_40x96x96):
    # Scales of 10 and 20 nm reach 4 planes along z: slabs of 16 planes and more.
    volume, truth = phantom_40x96x96
    model = NanoparticleClassifier(spacing=SPACING, sigmas=(10, 20), random_state=0, n_jobs=1, max_samples=20_000)
    return model.fit(volume[:12], truth[:12])


def _planes_per_slab(model, volume):
    from nanoseg._volume import as_volume

    return model._chunks(as_volume(volume), model._spec(volume.ndim == 2))[0][0]


def _copy_fitted(model, **params):
    copy = clone(model).set_params(**params)
    copy.__dict__.update({k: v for k, v in model.__dict__.items() if k.endswith("_")})
    return copy


# -- basic behaviour -------------------------------------------------------------
def test_probability_map_has_the_input_shape_and_finds_the_particles(fitted, phantom_40x96x96):
    volume, truth = phantom_40x96x96
    probability = fitted.predict_proba(volume)
    assert probability.shape == volume.shape and probability.dtype == np.float32
    assert probability.min() >= 0 and probability.max() <= 1
    # Held-out planes: most particle voxels above 0.5, few background ones.
    held_out = slice(12, None)
    mask = probability[held_out] >= 0.5
    recall = (mask & truth[held_out]).sum() / truth[held_out].sum()
    false_rate = (mask & ~truth[held_out]).sum() / (~truth[held_out]).sum()
    assert recall > 0.8 and false_rate < 0.01
    assert np.array_equal(fitted.transform(volume), probability)
    assert np.array_equal(fitted.predict(volume, threshold=0.5), probability >= 0.5)


def test_fitted_attributes_describe_the_model(fitted):
    assert list(fitted.classes_) == [0, 1]
    assert fitted.n_dims_ == 3
    assert fitted.n_features_ == len(fitted.feature_names_) == fitted.estimator_.n_features_in_
    assert fitted.particle_sign_ == 1
    assert 0.95 <= fitted.gate_recall_ <= 1.0
    assert 0 < fitted.gate_fraction_ < 0.5
    assert fitted.n_samples_per_class_.sum() <= 20_000


def test_lists_of_crops_of_different_shapes_give_lists(phantom_40x96x96):
    volume, truth = phantom_40x96x96
    crops = [volume[:10, :60, :70], volume[10:, 20:, :]]
    masks = [truth[:10, :60, :70], truth[10:, 20:, :]]
    model = NanoparticleClassifier(random_state=0, n_jobs=1, max_samples=5000).fit(crops, masks)
    out = model.predict_proba(crops)
    assert isinstance(out, list) and [o.shape for o in out] == [c.shape for c in crops]


def test_images_and_volumes_are_not_mixed(phantom_40x96x96, fitted):
    volume, truth = phantom_40x96x96
    with pytest.raises(ValueError, match="mixes 2D images and 3D volumes"):
        NanoparticleClassifier().fit([volume[0], volume[:4]], [truth[0], truth[:4]])
    with pytest.raises(ValueError, match="trained on volumes"):
        fitted.predict_proba(volume[0])


def test_dark_particles_are_learned_and_gated_from_below():
    image, mask = make_phantom((128, 128), n_particles=20, random_state=4)
    dark = 255 - image
    model = NanoparticleClassifier(random_state=0, n_jobs=1, max_samples=5000).fit(dark, mask)
    assert model.particle_sign_ == -1
    assert model.gate_recall_ > 0.95
    predicted = model.predict(dark)
    assert (predicted & mask).sum() / mask.sum() > 0.8


def test_the_gate_only_removes_work_not_particles(phantom_40x96x96):
    volume, truth = phantom_40x96x96
    gated = NanoparticleClassifier(spacing=SPACING, random_state=0, n_jobs=1, max_samples=5000)
    gated.fit(volume[:12], truth[:12])
    ungated = clone(gated).set_params(gate_recall=None).fit(volume[:12], truth[:12])
    assert ungated.gate_level_ is None and ungated.gate_fraction_ == 1.0
    p_gated = gated.predict_proba(volume)
    p_all = ungated.predict_proba(volume)
    # Same training voxels, same forest: the gate sets voxels to 0 and changes nothing else.
    inside = p_gated > 0
    assert np.array_equal(p_gated[inside], p_all[inside])
    outside_particles = truth & ~inside
    assert outside_particles.sum() <= 0.05 * truth.sum()


def test_features_of_matches_the_classified_features(fitted, phantom_40x96x96):
    volume, _ = phantom_40x96x96
    feats = fitted.features_of(volume[:6])
    assert feats.shape == (fitted.n_features_, 6, 96, 96)
    proba = fitted.estimator_.predict_proba(feats.reshape(feats.shape[0], -1).T)[:, 1].reshape(6, 96, 96)
    got = fitted.predict_proba(volume[:6])
    inside = got > 0
    np.testing.assert_allclose(got[inside], proba[inside], rtol=0, atol=1e-6)


# -- the acceptance scenario: two annotated crops of a large phantom -------------
def _best_mixture_labels(posterior, truth, crops):
    best = None
    for threshold in (0.5, 0.8, 0.9, 0.95, 0.99):
        for radius in (0, 1):
            for min_size in (3, 10):
                labeler = NanoparticleLabeler(threshold=threshold, radius=radius, min_size=min_size, n_jobs=1)
                f1 = np.mean(
                    [match_objects(labeler.transform(posterior[c]), truth[c])["f1"] for c in crops]
                )
                if best is None or f1 > best[0]:
                    best = (f1, labeler)
    return best[1]


@pytest.mark.slow  # a 64 x 512 x 512 phantom with 800 particles
def test_learned_pipeline_beats_the_tuned_mixture_on_a_phantom():
    volume, truth = make_phantom((64, 512, 512), n_particles=800, random_state=3)
    crops = [np.s_[0:16, 0:128, 0:128], np.s_[32:48, 128:256, 0:128]]
    held_out = np.s_[:, :, 256:]  # never annotated
    classifier = NanoparticleClassifier(spacing=SPACING, random_state=0, n_jobs=2)
    classifier.fit([volume[c] for c in crops], [truth[c] for c in crops])
    labels = NanoparticleLabeler(threshold=0.5, radius=0, min_size=3).transform(
        classifier.predict_proba(volume[held_out])
    )
    learned = match_objects(labels, truth[held_out])["f1"]

    posterior = NanoparticleMixture().fit_transform(volume)
    labeler = _best_mixture_labels(posterior, truth, crops)
    mixture = match_objects(labeler.transform(posterior[held_out]), truth[held_out])["f1"]
    assert learned >= mixture + 0.10, (learned, mixture)


# -- out of core: slabs and chunks give the whole-array result --------------------
def _as_zarr(array, chunks):
    z = zarr.create_array(store={}, shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[:] = array
    return z


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    depth=st.integers(1, 24),
    rows=st.integers(8, 96),
    cols=st.integers(8, 96),
    budget=st.sampled_from([None, 2**14, 2**18]),
)
def test_zarr_input_gives_the_whole_array_result_over_chunkings(fitted, phantom_40x96x96, depth, rows, cols, budget):
    volume, _ = phantom_40x96x96
    whole = fitted.predict_proba(volume)
    model = _copy_fitted(fitted, memory_budget=budget)
    lazy = model.predict_proba(_as_zarr(volume, (depth, rows, cols)))
    assert type(lazy).__module__.startswith("dask")
    assert np.array_equal(lazy.compute(), whole)


def test_small_slabs_in_memory_give_the_whole_array_result(fitted, phantom_40x96x96, small_slabs):
    volume, _ = phantom_40x96x96
    whole = fitted.predict_proba(volume)
    small_slabs(2**12)
    assert _planes_per_slab(fitted, volume) < volume.shape[0]
    assert np.array_equal(fitted.predict_proba(volume), whole)
    assert np.array_equal(_copy_fitted(fitted, n_jobs=2).predict_proba(volume), whole)


def test_blocks_within_the_plane_give_the_whole_array_result(fitted, phantom_40x96x96, monkeypatch):
    import nanoseg.classifier as classifier_module

    volume, _ = phantom_40x96x96
    whole = fitted.predict_proba(volume)
    monkeypatch.setattr(classifier_module, "BLOCK_SIDE", 40)
    model = _copy_fitted(fitted, memory_budget=2**16, n_jobs=2)
    chunks = model._chunks(__import__("nanoseg._volume", fromlist=["as_volume"]).as_volume(volume), model._spec(False))
    assert len(chunks[0]) > 1 and len(chunks[1]) > 1 and len(chunks[2]) > 1
    assert np.array_equal(model.predict_proba(volume), whole)
    assert np.array_equal(model.predict_proba(_as_zarr(volume, (7, 30, 50))).compute(), whole)


def test_prior_posterior_feature_is_exact_on_slabs(phantom_40x96x96):
    volume, truth = phantom_40x96x96
    model = NanoparticleClassifier(
        prior=NanoparticleMixture(tol=1e-6), spacing=SPACING, sigmas=(10, 20), random_state=0, n_jobs=1, max_samples=5000
    )
    model.fit(volume[:12], truth[:12])
    assert model.feature_names_[-1] == "posterior_logit"
    whole = model.predict_proba(volume)
    model.set_params(memory_budget=2**12)
    assert _planes_per_slab(model, volume) < volume.shape[0]
    assert np.array_equal(model.predict_proba(_as_zarr(volume, (5, 96, 96))).compute(), whole)
    assert np.array_equal(model.predict_proba(volume), whole)


# -- annotations ---------------------------------------------------------------------
def test_unannotated_voxels_are_never_used(phantom_40x96x96):
    volume, truth = phantom_40x96x96
    y = np.full(volume.shape, -1, dtype=np.int32)
    annotated = np.zeros(volume.shape, dtype=bool)
    annotated[:8, :48, :48] = True
    y[annotated] = truth[annotated]
    model = NanoparticleClassifier(spacing=SPACING, random_state=0, n_jobs=1, max_samples=4000)
    first = clone(model).fit(volume, y)

    # Shuffle the intensities of the unannotated voxels out of the features'
    # reach of any annotated one: the histogram (hence the normalisation) and
    # every annotated voxel's features stay the same.
    reach = support(first._spec(False))
    reach = tuple(r + m for r, m in zip(reach, first._margin(False)))
    near = ndi.maximum_filter(annotated.view(np.uint8), size=tuple(2 * r + 1 for r in reach)).view(bool)
    far = ~near
    assert far.sum() > 1000
    changed = volume.copy()
    rng = np.random.default_rng(0)
    changed[far] = rng.permutation(volume[far])
    assert not np.array_equal(changed, volume)
    second = clone(model).fit(changed, y)

    probe = np.random.default_rng(1).normal(size=(500, first.n_features_)).astype(np.float32)
    assert np.array_equal(first.estimator_.predict_proba(probe), second.estimator_.predict_proba(probe))
    assert first.gate_level_ == second.gate_level_


def test_sampling_draws_only_annotated_voxels_balanced_between_classes():
    rng = np.random.default_rng(0)
    maps = [rng.choice([-1, 0, 1], size=(20, 30), p=[0.6, 0.35, 0.05]).astype(np.int8) for _ in range(3)]
    picks, targets = _annotations.sample(maps, 100, random_state=0)
    for m, p, t in zip(maps, picks, targets):
        assert np.all(m.ravel()[p] == t) and np.all(t >= 0)
    counts = np.bincount(np.concatenate(targets))
    assert counts[0] == 50 and counts[1] == min(50, sum(int((m == 1).sum()) for m in maps))


def test_touching_particles_are_kept_apart_with_a_border_class():
    image = np.full((64, 64), 40, dtype=np.uint8)
    labels = np.zeros((64, 64), dtype=np.int32)
    rng = np.random.default_rng(0)
    count = 0
    for top in range(4, 56, 14):
        for left in range(4, 50, 22):
            # Two squares sharing a face: one particle each.
            count += 2
            labels[top : top + 8, left : left + 8] = count - 1
            labels[top : top + 8, left + 8 : left + 16] = count
    image[labels > 0] = 200
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    with_border = NanoparticleClassifier(border_width=1, random_state=0, n_jobs=1).fit(image, labels)
    assert list(with_border.classes_) == [0, 1, 2]
    separate = NanoparticleLabeler(threshold=0.5, radius=0, min_size=5).transform(with_border.predict_proba(image))
    merged = NanoparticleClassifier(border_width=0, random_state=0, n_jobs=1).fit(image, labels)
    joined = NanoparticleLabeler(threshold=0.5, radius=0, min_size=5).transform(merged.predict_proba(image))
    assert joined.max() == count // 2
    assert separate.max() == count
    assert match_objects(separate, labels)["f1"] > 0.9


def test_touching_borders_mark_only_faces_between_particles():
    labels = np.zeros((1, 6, 10), dtype=np.int32)
    labels[0, 1:5, 1:5] = 1
    labels[0, 1:5, 5:9] = 2
    border = _annotations.touching_borders(labels, 1, is_2d=False)
    assert set(np.unique(np.nonzero(border)[2])) == {4, 5}
    alone = np.where(labels == 2, 0, labels)
    assert not _annotations.touching_borders(alone, 1, is_2d=False).any()


# -- scikit-learn API ----------------------------------------------------------------
def test_clone_and_params_round_trip():
    model = NanoparticleClassifier(sigmas=(10, 20), spacing=SPACING, prior=NanoparticleMixture(beta_prior=(1, 5)))
    params = model.get_params()
    assert params["prior__beta_prior"] == (1, 5)
    copy = clone(model)
    assert copy.get_params()["sigmas"] == (10, 20)
    copy.set_params(prior__beta_prior=(2, 3), classifier=LogisticRegression())
    assert model.prior.beta_prior == (1, 5)


def test_grid_search_over_classifier_and_labeler_with_two_jobs():
    crops, masks = [], []
    for seed in range(4):
        image, mask = make_phantom((80, 80), n_particles=10, random_state=seed)
        crops.append(image)
        masks.append(mask)
    pipeline = Pipeline(
        [
            ("classifier", NanoparticleClassifier(n_jobs=1, random_state=0, max_samples=3000)),
            ("labeler", NanoparticleLabeler(radius=0, min_size=3, n_jobs=1)),
        ]
    )
    search = GridSearchCV(
        pipeline,
        {"classifier__sigmas": [(1, 2), (1, 2, 4)], "labeler__threshold": [0.3, 0.6]},
        scoring=make_object_scorer(),
        cv=KFold(2),
        n_jobs=2,
        error_score="raise",
    )
    search.fit(crops, masks)
    assert set(search.best_params_) == {"classifier__sigmas", "labeler__threshold"}
    assert search.best_score_ > 0.6


def test_unfitted_classifier_refuses_to_predict():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        NanoparticleClassifier().predict_proba(np.zeros((8, 8), np.uint8))


# -- bad input -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_y, message",
    [
        (lambda m: m[:-1], "shape"),
        (lambda m: m.astype(float), "boolean mask or integer labels"),
        (lambda m: np.zeros(m.shape, bool), "single class"),
        (lambda m: np.ones(m.shape, bool), "single class"),
        (lambda m: np.full(m.shape, -1, np.int16), "no voxel"),
        (lambda m: np.full(m.shape, -3, np.int16), "below -1"),
    ],
)
def test_bad_annotations_are_refused(make_y, message):
    image, mask = make_phantom((48, 48), n_particles=5, random_state=0)
    with pytest.raises(ValueError, match=message):
        NanoparticleClassifier().fit(image, make_y(mask))


def test_lists_must_match():
    image, mask = make_phantom((48, 48), n_particles=5, random_state=0)
    with pytest.raises(ValueError, match="2 crops"):
        NanoparticleClassifier().fit([image, image], [mask])
    with pytest.raises(ValueError, match="both be lists"):
        NanoparticleClassifier().fit([image], mask)
    with pytest.raises(ValueError, match="annotations y"):
        NanoparticleClassifier().fit(image, None)


def test_bad_images_and_parameters_are_refused():
    image, mask = make_phantom((48, 48), n_particles=5, random_state=0)
    with pytest.raises(TypeError, match="uint8 or uint16"):
        NanoparticleClassifier().fit(image.astype(np.float32), mask)
    with pytest.raises(ValueError, match="constant"):
        NanoparticleClassifier().fit(np.full((48, 48), 7, np.uint8), mask)
    with pytest.raises(ValueError, match="features"):
        NanoparticleClassifier(features=("intensity", "wavelets")).fit(image, mask)
    with pytest.raises(ValueError, match="spacing"):
        NanoparticleClassifier(spacing=(0, 1, 1)).fit(image, mask)
    with pytest.raises(ValueError, match="sigmas"):
        NanoparticleClassifier(sigmas=(-1,)).fit(image, mask)
    with pytest.raises(InvalidParameterError):
        NanoparticleClassifier(normalize="zscore").fit(image, mask)
    with pytest.raises(ValueError, match="threshold"):
        NanoparticleClassifier(n_jobs=1).fit(image, mask).predict(image, threshold=2)


# -- features ------------------------------------------------------------------------
def test_features_on_a_crop_equal_those_of_the_whole_image_inside_the_reach():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 40, 40)).astype(np.float32)
    spec = FeatureSpec(("intensity", "gaussian", "dog", "gradient", "hessian", "contrast"), ((0.4, 2, 2), (0.8, 4, 4)))
    from nanoseg._backend import CPU

    whole = compute_features(CPU, image, spec).reshape(-1, *image.shape)
    reach = support(spec)
    crop = tuple(slice(r, s - r) for r, s in zip(reach, image.shape))
    inner = np.zeros(image.shape, bool)
    inner[tuple(slice(2 * r, s - 2 * r) for r, s in zip(reach, image.shape))] = True
    part = compute_features(CPU, image[crop], spec, where=inner[crop])
    assert np.array_equal(part, whole[:, inner])


def test_hessian_eigenvalues_match_numpy():
    from nanoseg._ops.filters import _eigenvalues_3d

    rng = np.random.default_rng(0)
    a, b, c, d, e, f = rng.normal(size=(6, 200))
    ours = np.stack(_eigenvalues_3d(np, a, b, c, d, e, f), axis=1)
    matrices = np.stack([np.stack([a, d, e], -1), np.stack([d, b, f], -1), np.stack([e, f, c], -1)], -2)
    reference = np.linalg.eigvalsh(matrices)[:, ::-1]
    np.testing.assert_allclose(ours, reference, atol=1e-9)


def test_features_on_the_stand_in_gpu_match_the_cpu(fitted, phantom_40x96x96, fake_gpu):
    volume, truth = phantom_40x96x96
    cpu = fitted.predict_proba(volume)
    gpu_model = _copy_fitted(fitted, device="cuda")
    np.testing.assert_allclose(gpu_model.predict_proba(volume), cpu, atol=1e-6)
    np.testing.assert_allclose(gpu_model.features_of(volume[:4]), fitted.features_of(volume[:4]), atol=1e-5)
    refit = clone(gpu_model).fit(volume[:12], truth[:12])
    assert refit.n_features_ == fitted.n_features_


def test_slabs_in_flight_on_the_stand_in_gpu_are_capped(fitted, phantom_40x96x96, fake_gpu, monkeypatch):
    import nanoseg.classifier as classifier_module
    from nanoseg._plan import GPU_SLABS_IN_FLIGHT

    volume, _ = phantom_40x96x96
    seen = []
    original = classifier_module.classify_in_memory

    def recording(volume, slab, chunks, n_jobs, bar):
        seen.append(n_jobs)
        return original(volume, slab, chunks, n_jobs, bar)

    monkeypatch.setattr(classifier_module, "classify_in_memory", recording)
    _copy_fitted(fitted, device="cuda", n_jobs=GPU_SLABS_IN_FLIGHT + 3).predict_proba(volume[:8])
    _copy_fitted(fitted, device="cpu", n_jobs=GPU_SLABS_IN_FLIGHT + 3).predict_proba(volume[:8])
    assert seen == [GPU_SLABS_IN_FLIGHT, GPU_SLABS_IN_FLIGHT + 3]


def test_stand_in_gpu_features_one_block_at_a_time_in_larger_crops(fitted, phantom_40x96x96, fake_gpu, monkeypatch):
    # Blocks classified on dask's threads compute their GPU features one at
    # a time, in crops of up to GPU_CROP_VOXELS; on the CPU, in parallel
    # crops of up to CROP_VOXELS.
    import threading
    import time

    import dask.array as da

    import nanoseg._engine.classify as classify_module

    volume, _ = phantom_40x96x96
    expected = fitted.predict_proba(volume)
    lock = threading.Lock()
    state = {"inside": 0, "most": 0}
    original_features = classify_module.compute_features

    def counting(*args, **kwargs):
        with lock:
            state["inside"] += 1
            state["most"] = max(state["most"], state["inside"])
        time.sleep(0.01)  # long enough for other threads to arrive
        try:
            return original_features(*args, **kwargs)
        finally:
            with lock:
                state["inside"] -= 1

    sizes = []
    original_crops = classify_module._crops

    def recording(wanted, reach, max_voxels):
        sizes.append(max_voxels)
        return original_crops(wanted, reach, max_voxels)

    monkeypatch.setattr(classify_module, "compute_features", counting)
    monkeypatch.setattr(classify_module, "_crops", recording)
    lazy = da.from_array(volume, chunks=(20, 48, 48))
    # A tiny budget: blocks of a few planes, classified on several threads.
    gpu = _copy_fitted(fitted, device="cuda", n_jobs=4, memory_budget=4096)
    np.testing.assert_allclose(gpu.predict_proba(lazy).compute(scheduler="threads", num_workers=4), expected, atol=1e-6)
    assert state["most"] == 1 and set(sizes) == {classify_module.GPU_CROP_VOXELS}
    state["most"], sizes[:] = 0, []
    _copy_fitted(fitted, n_jobs=4, memory_budget=4096).predict_proba(lazy).compute(scheduler="threads", num_workers=4)
    assert state["most"] > 1 and set(sizes) == {classify_module.CROP_VOXELS}


def test_components_of_labels_and_masks_are_particles():
    # Instance labels and the equivalent boolean mask learn the same two classes
    # when no particles touch.
    image, mask = make_phantom((96, 96), n_particles=6, cluster_fraction=0, random_state=2)
    labels = skimage_label(mask)
    a = NanoparticleClassifier(random_state=0, n_jobs=1).fit(image, mask)
    b = NanoparticleClassifier(random_state=0, n_jobs=1).fit(image, labels)
    assert list(a.classes_) == list(b.classes_) == [0, 1]
    assert np.array_equal(a.predict_proba(image), b.predict_proba(image))


def test_block_sizes_merge_a_last_block_thinner_than_the_halo():
    from nanoseg._engine.classify import axis_chunks

    assert axis_chunks(515, 512, 16) == (515,)
    assert axis_chunks(1030, 512, 16) == (512, 518)
    assert axis_chunks(1100, 512, 16) == (512, 512, 76)
    assert sum(axis_chunks(97, 10, 3)) == 97


def test_images_a_little_larger_than_a_block_are_classified():
    image, mask = make_phantom((515, 520), n_particles=40, random_state=5)
    model = NanoparticleClassifier(n_jobs=1, random_state=0, max_samples=4000).fit(image, mask)
    probability = model.predict_proba(image)
    assert probability.shape == image.shape
    assert ((probability >= 0.5) & mask).sum() > 0.7 * mask.sum()


# -- intensity normalisation ------------------------------------------------------------
def test_otsu_normalisation_splits_at_scikit_images_otsu_threshold():
    from skimage.filters import threshold_otsu

    from nanoseg._engine.classify import two_class_location_scale

    rng = np.random.default_rng(5)
    for share in (0.02, 0.3, 0.7):
        n_bright = int(20000 * share)
        values = np.concatenate([rng.normal(70, 12, 20000 - n_bright), rng.normal(180, 20, n_bright)])
        image = values.clip(0, 255).astype(np.uint8)
        threshold, scale = two_class_location_scale(np.bincount(image, minlength=256))
        # skimage: values > t are the upper class; here values >= threshold.
        assert threshold == threshold_otsu(image) + 0.5
        low, high = image[image < threshold], image[image > threshold]
        assert scale == pytest.approx((high.mean() - low.mean()) / 2)
    with pytest.raises(ValueError, match="constant"):
        two_class_location_scale(np.bincount(np.full(10, 9, np.uint8), minlength=256))


def test_otsu_normalisation_makes_brightness_and_contrast_changes_invisible():
    # The same scene acquired with another gain and offset (and no
    # saturation) gives the same probabilities: the normalised intensities
    # are the same up to rounding.
    image, mask = make_phantom((96, 96), n_particles=12, random_state=4)
    model = NanoparticleClassifier(n_jobs=1, random_state=0, gate_recall=None, max_samples=4000).fit(image, mask)
    darker = (image.astype(np.int16) // 2 + 20).astype(np.uint8)
    flatter = (image * 0.8 + 30).astype(np.uint8)
    reference = model.predict(image)
    for changed in (darker, flatter):
        other = model.predict(changed)
        assert (other != reference).mean() < 0.01
    # Without normalisation the darker copy loses particles.
    raw = NanoparticleClassifier(normalize="none", n_jobs=1, random_state=0, gate_recall=None, max_samples=4000)
    raw.fit(image, mask)
    assert raw.predict(darker).sum() < 0.5 * raw.predict(image).sum()


def test_large_volumes_are_normalised_from_the_same_sample_wherever_they_are_stored(tmp_path):
    from nanoseg._engine.classify import histogram
    from nanoseg._volume import as_volume

    rng = np.random.default_rng(2)
    # Each plane holds only its own index: the counts say which planes were read.
    volume = np.broadcast_to(np.arange(40, dtype=np.uint8)[:, None, None], (40, 16, 16)).copy()
    volume[:, 0, 0] = rng.integers(0, 255, 40)
    whole = histogram(as_volume(volume))
    assert whole.sum() == volume.size
    plane = 16 * 16
    counts = []
    for chunks in [None, (1, 16, 16), (7, 8, 16), (40, 16, 16)]:
        if chunks is None:
            source = volume
        else:
            source = zarr.create_array(tmp_path / f"v{chunks[0]}.zarr", shape=volume.shape, chunks=chunks, dtype=np.uint8)
            source[:] = volume
        counts.append(histogram(as_volume(source), max_voxels=10 * plane))
    for other in counts[1:]:
        np.testing.assert_array_equal(other, counts[0])
    sampled = counts[0]
    planes_read = np.flatnonzero(sampled >= plane - 40)
    assert 10 <= sampled.sum() / plane <= 20 < 40
    assert planes_read[0] == 0 and planes_read[-1] == 39


def test_otsu_and_background_units_give_both_sets_of_smoothed_intensities():
    image, mask = make_phantom((12, 64, 64), n_particles=10, random_state=6)
    both = NanoparticleClassifier(normalize="otsu+background", n_jobs=1, random_state=0, max_samples=3000)
    both.fit(image, mask)
    otsu = NanoparticleClassifier(normalize="otsu", n_jobs=1, random_state=0, max_samples=3000).fit(image, mask)
    background = NanoparticleClassifier(normalize="background", n_jobs=1, random_state=0, max_samples=3000)
    background.fit(image, mask)
    added = [name for name in both.feature_names_ if name.endswith(":background")]
    assert added == ["intensity:background"] + [f"{n}:background" for n in otsu.feature_names_ if n.startswith("gaussian@")]
    assert both.feature_names_[: otsu.n_features_] == otsu.feature_names_
    features = both.features_of(image)
    assert features.shape == (both.n_features_, *image.shape)
    np.testing.assert_array_equal(features[: otsu.n_features_], otsu.features_of(image))
    # The added columns are the background-normalised model's own columns.
    direct = background.features_of(image)
    for name in added:
        own = direct[background.feature_names_.index(name.removesuffix(":background"))]
        np.testing.assert_allclose(features[both.feature_names_.index(name)], own, rtol=1e-4, atol=1e-4)
    # Slabs of a zarr copy give the in-memory probabilities.
    lazy = np.asarray(both.predict_proba(zarr.array(image, chunks=(3, 32, 32))))
    np.testing.assert_array_equal(lazy, both.predict_proba(image))
