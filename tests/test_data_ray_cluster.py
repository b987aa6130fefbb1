"""The Ray executor joining an existing multi-node cluster (`--executor ray --ray_address ADDR`), as on
a real cluster: a head and a worker node simulated on this machine with `ray.cluster_utils.Cluster`
(separate raylets and object stores, one CPU each). Tasks spread over both nodes, and the data stage
run through the cluster writes exactly what the local executor writes."""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from chatforge.config import DataConfig, resolve_config  # noqa: E402
from chatforge.data.executor import RayExecutor  # noqa: E402
from chatforge.stages import data as data_stage  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def test_tasks_spread_over_the_nodes(cluster):
    def where(task: int) -> tuple[int, str, int]:  # local, so Ray ships it by value (tests/ is no package)
        time.sleep(0.5)  # long enough that one node cannot take every task
        return task, ray.get_runtime_context().get_node_id(), os.getpid()

    results = list(RayExecutor(workers=2, address=cluster.address).map_unordered(where, list(range(6))))
    assert sorted(r[0] for r in results) == list(range(6))
    assert len({r[1] for r in results}) == 2  # both nodes ran tasks
    assert len(ray.nodes()) == 2


def test_data_stage_on_the_cluster_equals_local(cluster, tmp_path, shared_data):
    import pyarrow.parquet as pq

    def run(name, **kw):
        cfg = resolve_config(DataConfig, overrides=dict(
            inputs=[str(shared_data / "web/dolma-sample-0000.warc.gz"), str(shared_data / "web/dolma-sample-0001.warc.gz"),
                    str(shared_data / "web/whirlwind.warc.gz")],
            runs_dir=str(tmp_path), run=name, data_dir=str(shared_data), languages=[], lang_threshold=0.0, **kw))
        stats = data_stage.run(cfg)
        shards = sorted((tmp_path / name / "data" / "shards").glob("*.parquet"))
        return stats, [i for f in shards for i in pq.read_table(f).column("id").to_pylist()]

    ray_stats, ray_ids = run("ray", executor="ray", ray_address=cluster.address, workers=2)
    local_stats, local_ids = run("local", workers=1)
    assert ray_ids == local_ids and len(local_ids) > 0
    assert ray_stats["docs_in"] == local_stats["docs_in"] and ray_stats["docs_out"] == len(ray_ids)
