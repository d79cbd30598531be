"""The pipeline on a dask.distributed cluster gives the local results."""

import numpy as np
import pytest
import zarr

from nanoseg import NanoparticleLabeler, NanoparticleMixture
from nanoseg.datasets import make_phantom

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        yield client


def test_local_cluster_matches_local(tmp_path, client, small_slabs):
    small_slabs(4 * 96 * 96 * 6)
    image, _ = make_phantom((16, 96, 96), n_particles=25, random_state=21)
    store = zarr.create_array(store=str(tmp_path / "image.zarr"), shape=image.shape, chunks=(2, 48, 96), dtype="uint8")
    store[...] = image
    z = zarr.open_array(str(tmp_path / "image.zarr"), mode="r")

    # The fixture's client is the default one: every dask computation,
    # including the labeller's analysis pass, runs on the cluster.
    mixture = NanoparticleMixture(max_iter=100_000).fit(z)
    with distributed.get_task_stream(client) as stream:
        posterior = mixture.transform(z)
        labels = NanoparticleLabeler(min_size=3).transform(posterior)
        on_cluster = labels.compute()
    workers = {task["worker"] for task in stream.data}
    assert workers and workers <= set(client.scheduler_info()["workers"])
    local_mixture = NanoparticleMixture(max_iter=100_000).fit(image)
    local = NanoparticleLabeler(min_size=3).transform(local_mixture.transform(image))
    np.testing.assert_array_equal(on_cluster, local)
    np.testing.assert_array_equal(posterior.compute(), local_mixture.transform(image))
