"""`features` across several Ray nodes on this machine (ray.cluster_utils.Cluster): a node holding a
teacher actor is removed mid-run; the run (or a rerun) still gives exactly the store of a local run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from feature_run import TEACHER, assert_same_features, copy_tiles, finished_units, make_reference, small_slide
from pipeline.config import Config
from pipeline.features.stage import run_features

# Eight views per tile make each unit take about a second, so the run is still going when the node goes.
# Two one-CPU actors: the one-CPU head holds at most one, so a worker node holds the other.
FEATURES = {"views": ["dihedral"], "actors": 2}
OBJECT_STORE_BYTES = 100 * 1024**2


@pytest.fixture
def reference(tmp_path, slide_factory, he_pixels) -> tuple[dict, dict]:
    """The tile store's settings and the features a plain local run computes from it."""
    return make_reference(tmp_path, small_slide(slide_factory, he_pixels, "nodes.tiff"), **FEATURES)


@pytest.fixture
def cluster(reference) -> Iterator[Cluster]:
    """A head with one CPU and two workers with two, all on this machine; the test connects to it.

    Made after the reference, because a plain ray.init() joins a running Cluster instead of starting Ray.
    """
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES})
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_removing_a_node_mid_run_still_gives_the_local_store(tmp_path, reference, cluster):
    reference_config, reference_features = reference
    config = Config.model_validate({**copy_tiles(reference_config, tmp_path / "nodes"), "ray": {"address": cluster.address}})
    ray.init(address=cluster.address)
    store = tmp_path / "nodes" / "features" / f"{TEACHER}.zarr"
    errors: list[Exception] = []

    def first_run() -> None:
        try:
            run_features(config)
        except Exception as error:  # a lost node may fail the run; the rerun below must then finish it
            errors.append(error)

    running = threading.Thread(target=first_run)
    running.start()
    deadline = time.monotonic() + 300
    while not finished_units(store):
        assert running.is_alive() and time.monotonic() < deadline, f"no unit finished: {errors}"
        time.sleep(0.05)
    actor_nodes = {a.node_id for a in list_actors(filters=[("class_name", "=", "EmbedWorker"), ("state", "=", "ALIVE")])}
    (victim, *_) = [node for node in cluster.worker_nodes if node.node_id in actor_nodes]
    finished_before_removal = finished_units(store)
    cluster.remove_node(victim)
    running.join(timeout=600)
    assert not running.is_alive() and finished_before_removal < 6  # the node went while units were still to do

    run_features(config)  # does whatever the first run left undone
    assert finished_units(store) == 6
    assert_same_features(Path(config.run), reference_features)
