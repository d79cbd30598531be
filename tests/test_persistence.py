"""Model files: faithful round trips, and refusal of anything that is not one."""

import io
import json
import math
import os
import pickle
import zipfile

import joblib
import numpy as np
import pytest
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

import nanoseg
from nanoseg import NanoparticleLabeler, NanoparticleMixture, persistence
from nanoseg.baselines import GlobalThreshold
from nanoseg.persistence import ModelVersionWarning, load, save

DOCUMENT = "nanoseg_model.json"


@pytest.fixture(scope="module")
def mixture(volume_8x80x80):
    return NanoparticleMixture(beta_prior=(1.0, 30.0)).fit(volume_8x80x80)


@pytest.fixture(scope="module")
def posterior(mixture, volume_8x80x80):
    return mixture.predict_proba(volume_8x80x80)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "model.npz"


def round_trip(estimator, path):
    save(estimator, path)
    return load(path)


def fitted_attributes(estimator):
    return {k: v for k, v in vars(estimator).items() if k.endswith("_") and not k.startswith("_")}


def assert_same_value(restored, original):
    """Equal value and exactly the same type (and dtype for NumPy values)."""
    assert type(restored) is type(original), (restored, original)
    if isinstance(original, (np.ndarray, np.generic)):
        assert restored.dtype == original.dtype
        assert restored.shape == original.shape
        # Compare bit patterns: NaN-safe and stricter than ==.
        assert np.asarray(restored).tobytes() == np.asarray(original).tobytes()
    elif isinstance(original, (list, tuple)):
        assert len(restored) == len(original)
        for a, b in zip(restored, original, strict=True):
            assert_same_value(a, b)
    elif isinstance(original, dict):
        assert list(restored) == list(original)
        for key in original:
            assert_same_value(restored[key], original[key])
    elif isinstance(original, BaseEstimator):
        assert_same_estimator(restored, original)
    elif isinstance(original, float) and math.isnan(original):
        assert math.isnan(restored)
    else:
        assert restored == original


def assert_same_estimator(restored, original):
    assert type(restored) is type(original)
    assert_same_value(restored.get_params(deep=False), original.get_params(deep=False))
    assert_same_value(fitted_attributes(restored), fitted_attributes(original))


def rewrite(path, edit=None, entries=None):
    """Rewrite a model file with its JSON document edited and/or entries replaced."""
    with zipfile.ZipFile(path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    document = json.loads(contents[DOCUMENT])
    if edit is not None:
        edit(document)
    contents[DOCUMENT] = json.dumps(document).encode()
    contents.update(entries or {})
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)


def npy_bytes(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


# -- round trips -------------------------------------------------------------


def test_mixture_round_trip_gives_bit_identical_posterior(mixture, volume_8x80x80, posterior, path):
    restored = round_trip(mixture, path)
    assert_same_estimator(restored, mixture)
    assert restored.low_intensity_ == mixture.low_intensity_
    again = restored.predict_proba(volume_8x80x80)
    assert again.dtype == posterior.dtype
    assert again.tobytes() == posterior.tobytes()
    np.testing.assert_array_equal(restored.slice_weights(volume_8x80x80), mixture.slice_weights(volume_8x80x80))


def test_labeler_round_trip_gives_identical_labels(posterior, path):
    labeler = NanoparticleLabeler(threshold=0.8, radius=2, connectivity=3, min_size=3, memory_budget="64MiB")
    restored = round_trip(labeler, path)
    assert_same_estimator(restored, labeler)
    np.testing.assert_array_equal(restored.transform(posterior), labeler.transform(posterior))


@pytest.mark.parametrize(
    "baseline",
    [
        GlobalThreshold(method="otsu"),
        GlobalThreshold(method="tile_maxima", tile_size=16, tile_factor=1.1),
        GlobalThreshold(method="fixed", threshold=100, polarity="dark"),
    ],
)
def test_global_threshold_round_trip(baseline, volume_8x80x80, path):
    baseline.fit(volume_8x80x80)
    restored = round_trip(baseline, path)
    assert_same_estimator(restored, baseline)
    assert type(restored.threshold_) is int
    out = restored.transform(volume_8x80x80)
    assert out.tobytes() == baseline.transform(volume_8x80x80).tobytes()


def test_pipeline_round_trip_gives_identical_labels(volume_8x80x80, path):
    pipeline = Pipeline(
        [("mixture", NanoparticleMixture(beta_prior=(1.0, 30.0))), ("labeler", NanoparticleLabeler(min_size=3))]
    )
    labels = pipeline.fit_transform(volume_8x80x80)
    assert labels.max() > 0
    restored = round_trip(pipeline, path)
    assert list(restored.named_steps) == ["mixture", "labeler"]
    assert_same_estimator(restored, pipeline)
    np.testing.assert_array_equal(restored.transform(volume_8x80x80), labels)


def test_gpu_model_loads_without_a_gpu(mixture, volume_8x80x80, posterior, path):
    # device is only a parameter: loading never needs the device, and the
    # model runs on the CPU once told so.
    if "device" not in mixture.get_params():
        pytest.skip("this NanoparticleMixture has no device parameter")
    gpu_model = NanoparticleMixture().set_params(**{**mixture.get_params(), "device": "cuda"})
    for key, value in fitted_attributes(mixture).items():
        setattr(gpu_model, key, value)
    restored = round_trip(gpu_model, path)
    assert restored.device == "cuda"
    restored.set_params(device="cpu")
    assert restored.predict_proba(volume_8x80x80).tobytes() == posterior.tobytes()


def test_frozen_mixture_round_trip(mixture, volume_8x80x80, posterior, path):
    frozen = FrozenEstimator(mixture)
    restored = round_trip(frozen, path)
    assert type(restored) is FrozenEstimator
    assert_same_estimator(restored.estimator, mixture)
    assert restored.transform(volume_8x80x80).tobytes() == posterior.tobytes()


def default_constructible_registered_classes():
    classes = []
    for name, target in persistence._REGISTRY.items():
        try:
            cls = persistence._import_target(target)
            cls()
        except (ImportError, TypeError):
            continue  # not available, or has required parameters (Pipeline, wrappers)
        classes.append(pytest.param(cls, id=name))
    return classes


@pytest.mark.parametrize("cls", default_constructible_registered_classes())
def test_every_registered_class_round_trips_unfitted(cls, path):
    estimator = cls()
    assert_same_estimator(round_trip(estimator, path), estimator)


def test_unfitted_round_trip_keeps_parameters_and_stays_unfitted(path):
    mixture = NanoparticleMixture(beta_prior=(2.0, 30.0), halo_pad=5, memory_budget="64MiB", n_jobs=2)
    restored = round_trip(mixture, path)
    assert_same_estimator(restored, mixture)
    assert type(restored.get_params()["beta_prior"]) is tuple
    with pytest.raises(NotFittedError):
        check_is_fitted(restored)


def test_unfitted_pipeline_round_trip(path):
    pipeline = Pipeline([("mixture", NanoparticleMixture()), ("labeler", NanoparticleLabeler())])
    restored = round_trip(pipeline, path)
    assert_same_estimator(restored, pipeline)
    with pytest.raises(NotFittedError):
        check_is_fitted(restored.named_steps["mixture"])


class Holder(BaseEstimator):
    """A minimal estimator to carry arbitrary parameter and fitted values."""

    def __init__(self, *, value=None):
        self.value = value


@pytest.fixture
def holder_registered(monkeypatch):
    monkeypatch.setitem(persistence._REGISTRY, "TestHolder", Holder)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        2**70,
        1.0,
        -0.0,
        0.1,
        float("nan"),
        float("-inf"),
        "text",
        (1, 20),
        [1, 20],
        (1.0, None, ("nested", [2])),
        {"a": (1, None), "b": [1.5]},
        np.float32(0.5),
        np.int64(-3),
        np.bool_(True),
        np.arange(6, dtype=np.uint16).reshape(2, 3),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.array([1 + 2j]),
        np.zeros((0, 3), dtype=np.int8),
        [np.arange(3), np.float64(2.5)],
    ],
    ids=repr,
)
def test_values_round_trip_with_their_types(value, holder_registered, path):
    holder = Holder(value=value)
    holder.state_ = value
    restored = round_trip(holder, path)
    assert_same_value(restored.value, value)
    assert_same_value(restored.state_, value)


def test_nested_estimator_parameter_round_trips(holder_registered, path):
    holder = Holder(value=Holder(value=(GlobalThreshold(method="li"), 3)))
    assert_same_estimator(round_trip(holder, path), holder)


def test_same_model_gives_same_bytes(mixture, tmp_path):
    save(mixture, tmp_path / "a.npz")
    save(mixture, tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_file_is_an_npz_readable_without_pickle(mixture, path):
    save(mixture, path)
    with np.load(path, allow_pickle=False) as archive:
        document = json.loads(archive[DOCUMENT])
        fitted = document["estimator"]["fitted"]
        entry = fitted["particle_pmf_"]["ndarray"]
        np.testing.assert_array_equal(archive[entry], mixture.particle_pmf_)
    assert document["format"] == "nanoseg-model"
    assert document["format_version"] == persistence.FORMAT_VERSION
    assert document["nanoseg_version"] == nanoseg.__version__
    assert document["estimator"]["class"] == "NanoparticleMixture"
    assert set(fitted) == set(fitted_attributes(mixture))


def test_load_accepts_a_binary_file_object(mixture, path):
    save(mixture, path)
    with open(path, "rb") as stream:
        restored = load(io.BytesIO(stream.read()))
    assert_same_estimator(restored, mixture)


# -- writing -----------------------------------------------------------------


def test_refuses_to_overwrite_unless_asked(mixture, path):
    save(NanoparticleLabeler(), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(mixture, path)
    assert path.read_bytes() == before
    save(mixture, path, overwrite=True)
    assert isinstance(load(path), NanoparticleMixture)


def test_interrupted_save_leaves_no_file(mixture, path, monkeypatch):
    def fail_midway(archive, key, array):
        with archive.open(key + ".npy", "w") as member:
            member.write(b"\x93NUMPY partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(persistence, "_write_member", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        save(mixture, path)
    assert os.listdir(path.parent) == []


def test_interrupted_overwrite_keeps_the_old_file(mixture, path, monkeypatch):
    labeler = NanoparticleLabeler(threshold=0.5)
    save(labeler, path)
    monkeypatch.setattr(persistence, "_write_member", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        save(mixture, path, overwrite=True)
    assert os.listdir(path.parent) == [path.name]
    assert_same_estimator(load(path), labeler)


@pytest.mark.parametrize(
    "estimator, named",
    [
        (StandardScaler(), "StandardScaler"),
        (Pipeline([("scale", StandardScaler()), ("labeler", NanoparticleLabeler())]), r"steps\[0\]\[1\]"),
    ],
)
def test_unregistered_classes_cannot_be_saved(estimator, named, path):
    with pytest.raises(TypeError, match=named):
        save(estimator, path)
    assert not path.exists()


def test_unsafe_fitted_state_is_named(mixture, path):
    mixture = NanoparticleMixture().set_params(**mixture.get_params())
    mixture.callback_ = print
    with pytest.raises(TypeError, match="fitted attribute estimator.callback_"):
        save(mixture, path)
    mixture.callback_ = np.array([print], dtype=object)
    with pytest.raises(TypeError, match="callback_ .*dtype object"):
        save(mixture, path)
    assert not path.exists()


def test_unsafe_parameter_is_named(path):
    with pytest.raises(TypeError, match="parameter estimator.memory_budget"):
        save(NanoparticleLabeler(memory_budget=object()), path)


# -- reading: refusals ---------------------------------------------------------


def test_other_version_warns_naming_both(mixture, volume_8x80x80, posterior, path):
    save(mixture, path)
    rewrite(path, lambda doc: doc.update(nanoseg_version="0.0.1"))
    with pytest.warns(ModelVersionWarning, match=r"0\.0\.1.*" + nanoseg.__version__.replace(".", r"\.")) as record:
        restored = load(path)
    assert record[0].message.saved_version == "0.0.1"
    assert record[0].message.current_version == nanoseg.__version__
    assert restored.predict_proba(volume_8x80x80).tobytes() == posterior.tobytes()


def test_newer_format_version_is_refused(mixture, path):
    save(mixture, path)
    rewrite(path, lambda doc: doc.update(format_version=persistence.FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="format version 2.*Upgrade nanoseg"):
        load(path)


@pytest.mark.parametrize("version", [0, "1", 1.0, None])
def test_invalid_format_version_is_refused(version, mixture, path):
    save(mixture, path)
    rewrite(path, lambda doc: doc.update(format_version=version))
    with pytest.raises(ValueError, match="not a nanoseg model file"):
        load(path)


def test_pickle_and_joblib_files_are_not_model_files(mixture, tmp_path):
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(pickle.dumps(mixture))
    joblibbed = tmp_path / "model.joblib"
    joblib.dump(mixture, joblibbed)
    compressed = tmp_path / "model.joblib.z"
    joblib.dump(mixture, compressed, compress=3)
    for file in (pickled, joblibbed, compressed):
        with pytest.raises(ValueError, match="not a nanoseg model file.*trust"):
            load(file)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        os.urandom(1000),
        b"PK\x03\x04" + os.urandom(200),
        npy_bytes(np.arange(3)),
        npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True),
    ],
    ids=["empty", "random", "zip-magic", "npy", "pickled-npy"],
)
def test_other_content_is_not_a_model_file(content, path):
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a nanoseg model file"):
        load(path)


def test_npz_without_document_is_not_a_model_file(path):
    np.savez(path, a=np.arange(3))
    with pytest.raises(ValueError, match="not a nanoseg model file.*without the entry"):
        load(path)


@pytest.mark.parametrize("document", [b"{not json", b"[1, 2]", b'{"format": "other"}', b"\xff\xfe"])
def test_foreign_documents_are_not_model_files(document, path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(DOCUMENT, document)
    with pytest.raises(ValueError, match="not a nanoseg model file"):
        load(path)


def test_truncated_file_is_refused(mixture, path):
    save(mixture, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a nanoseg model file"):
        load(path)


def test_corrupted_array_entry_is_refused(mixture, path):
    save(mixture, path)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("estimator.particle_pmf_.npy")
    data = bytearray(path.read_bytes())
    # Flip bytes inside the entry's compressed data (after its local header).
    start = info.header_offset + 30 + len(info.filename) + 8
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        load(path)


def test_unknown_class_is_refused(mixture, path):
    save(mixture, path)
    rewrite(path, lambda doc: doc["estimator"].update({"class": "os.system"}))
    with pytest.raises(ValueError, match="unknown estimator class 'os.system'"):
        load(path)


def test_registered_class_whose_module_is_missing(monkeypatch, path):
    save(NanoparticleLabeler(), path)
    monkeypatch.setitem(persistence._REGISTRY, "Ghost", "nanoseg.no_such_module:Ghost")
    rewrite(path, lambda doc: doc["estimator"].update({"class": "Ghost"}))
    with pytest.raises(ValueError, match="cannot import"):
        load(path)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("posterior_dtype", "float64", "not valid.*posterior_dtype"),
        ("beta_prior", {"tuple": [-1.0, 2.0]}, "not valid.*beta_prior must be a pair"),
        ("halo_pad", -3, "not valid.*halo_pad"),
        ("max_iter", "many", "not valid.*max_iter"),
        ("no_such_parameter", 1, "does not have"),
    ],
)
def test_tampered_parameters_are_refused(name, value, message, mixture, path):
    save(mixture, path)
    rewrite(path, lambda doc: doc["estimator"]["params"].update({name: value}))
    with pytest.raises(ValueError, match=message):
        load(path)


def test_invalid_pipeline_steps_are_refused(path):
    save(Pipeline([("mixture", NanoparticleMixture()), ("labeler", NanoparticleLabeler())]), path)

    def duplicate_names(doc):
        steps = doc["estimator"]["params"]["steps"]
        steps[1]["tuple"][0] = "mixture"

    rewrite(path, duplicate_names)
    with pytest.raises(ValueError, match="not valid.*unique"):
        load(path)


class Payload:
    """Unpickling this records that code ran."""

    executed = []

    def __reduce__(self):
        return (Payload.executed.append, ("code ran",))


def test_pickled_array_entry_is_refused_without_running_it(mixture, path):
    save(mixture, path)
    payload = npy_bytes(np.array([Payload()], dtype=object), allow_pickle=True)
    rewrite(path, entries={"estimator.particle_pmf_.npy": payload})
    with pytest.raises(ValueError, match="pickled Python objects"):
        load(path)
    assert Payload.executed == []


def test_array_larger_than_its_entry_is_refused_before_allocation(mixture, path):
    save(mixture, path)
    header = io.BytesIO()
    shape = (10**12,)
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})

    def describe(doc):
        doc["estimator"]["fitted"]["particle_pmf_"]["shape"] = list(shape)

    rewrite(path, describe, {"estimator.particle_pmf_.npy": header.getvalue() + bytes(64)})
    with pytest.raises(ValueError, match="shorter than its shape requires"):
        load(path)


def test_structured_array_entry_is_refused(mixture, path):
    save(mixture, path)
    fake = np.zeros(256, dtype=[("a", "<f8")])

    def describe(doc):
        doc["estimator"]["fitted"]["particle_pmf_"]["dtype"] = fake.dtype.descr

    rewrite(path, describe, {"estimator.particle_pmf_.npy": npy_bytes(fake)})
    with pytest.raises(ValueError, match="only booleans and numbers"):
        load(path)


@pytest.mark.parametrize(
    "edit, array, message",
    [
        # An array that does not match what the document records.
        (None, np.zeros(255), "has dtype float64 and shape \\(255,\\).*records"),
        # Consistent entry and document, but not what the mixture expects.
        ("shape", np.zeros(255), r"expected an array of shape \(256,\)"),
        ("dtype", np.zeros(256, dtype=np.int64), "dtype kind f"),
    ],
)
def test_unexpected_fitted_arrays_are_refused(edit, array, message, mixture, path):
    save(mixture, path)

    def describe(doc):
        node = doc["estimator"]["fitted"]["particle_pmf_"]
        if edit:
            node.update(dtype=array.dtype.str, shape=list(array.shape))

    rewrite(path, describe, {"estimator.particle_pmf_.npy": npy_bytes(array)})
    with pytest.raises(ValueError, match=message):
        load(path)


def test_scalar_attribute_of_wrong_kind_is_refused(mixture, path):
    save(mixture, path)
    rewrite(path, lambda doc: doc["estimator"]["fitted"].update(n_iter_="many"))
    with pytest.raises(ValueError, match="at estimator.n_iter_, expected a scalar"):
        load(path)


def test_incomplete_fitted_state_is_refused(mixture, path):
    save(mixture, path)
    rewrite(path, lambda doc: doc["estimator"]["fitted"].pop("low_intensity_"))
    with pytest.raises(ValueError, match=r"lacks the attribute\(s\) \['low_intensity_'\]"):
        load(path)


@pytest.mark.parametrize("name", ["__class__", "_private_", "fit", "beta_prior", "named_"])
def test_fitted_names_that_could_shadow_the_class_are_refused(name, path):
    save(NanoparticleLabeler(), path)
    if name == "named_":
        # Shadowing a class attribute is refused too.
        NanoparticleLabeler.named_ = None
    try:
        rewrite(path, lambda doc: doc["estimator"]["fitted"].update({name: 1}))
        with pytest.raises(ValueError, match="not a possible fitted attribute"):
            load(path)
    finally:
        if name == "named_":
            del NanoparticleLabeler.named_


def test_unreferenced_or_missing_entries_are_refused(mixture, path):
    save(mixture, path)
    rewrite(path, entries={"extra.npy": npy_bytes(np.arange(3))})
    with pytest.raises(ValueError, match="entries no estimator uses.*extra"):
        load(path)
    save(mixture, path, overwrite=True)
    rewrite(path, lambda doc: doc["estimator"]["fitted"]["stack_pmf_"].update(ndarray="estimator.particle_pmf_"))
    with pytest.raises(ValueError, match="missing or used twice"):
        load(path)


def test_non_standard_json_constants_are_refused(path):
    save(NanoparticleLabeler(), path)
    with zipfile.ZipFile(path) as archive:
        text = archive.read(DOCUMENT).decode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(DOCUMENT, text.replace('"threshold": 0.95', '"threshold": NaN'))
    with pytest.raises(ValueError, match="not a nanoseg model file.*NaN"):
        load(path)


@pytest.mark.parametrize("depth", [500, 3000])
def test_deeply_nested_values_are_refused(depth, path):
    save(NanoparticleLabeler(), path)
    with zipfile.ZipFile(path) as archive:
        text = archive.read(DOCUMENT).decode()
    nested = "[" * depth + "]" * depth
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(DOCUMENT, text.replace('"threshold": 0.95', f'"threshold": {nested}'))
    with pytest.raises(ValueError, match="nested too deeply|recursion"):
        load(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.npz")


# -- registry ----------------------------------------------------------------


def test_register_estimator_makes_a_class_savable(monkeypatch, path):
    monkeypatch.setattr(persistence, "_REGISTRY", dict(persistence._REGISTRY))
    with pytest.raises(TypeError, match="register_estimator"):
        save(Holder(value=1), path)
    persistence.register_estimator("tests.Holder", Holder)
    persistence.register_estimator("tests.Holder", Holder)  # idempotent
    assert_same_estimator(round_trip(Holder(value=(1, 2)), path), Holder(value=(1, 2)))


@pytest.mark.parametrize(
    "name, target, message",
    [
        ("NanoparticleMixture", "nanoseg.labeler:NanoparticleLabeler", "already registered"),
        ("bad name", Holder, "dotted identifier"),
        ("Holder", "no_colon", "module:QualifiedName"),
        ("Holder", dict, "estimator class"),
    ],
)
def test_register_estimator_errors(name, target, message, monkeypatch):
    monkeypatch.setattr(persistence, "_REGISTRY", dict(persistence._REGISTRY))
    with pytest.raises(ValueError, match=message):
        persistence.register_estimator(name, target)


def test_registry_entries_are_well_formed():
    # Every entry that exists resolves to its class, under the name it is saved with.
    for name, target in persistence._REGISTRY.items():
        module_name, qualname = target.split(":")
        assert qualname.split(".")[-1] == name
        try:
            cls = persistence._import_target(target)
        except ImportError:
            continue  # a module that is optional or not written yet
        assert persistence._registered_name(cls, "x") == name
