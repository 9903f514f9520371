"""docs/SCALING.md's prototype, kept working: the job core's Redis functions on a three-node Valkey
Cluster (bench/cluster_prototype.py), with today's key layout and with one model in two partitions."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def test_partitioned_keys_run_the_job_core_on_a_cluster_and_todays_do_not():
    spec = importlib.util.spec_from_file_location("cluster_prototype", REPO / "bench" / "cluster_prototype.py")
    prototype = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prototype)
    report = prototype.run(jobs=40)
    assert len(report["today"]) == 3
    assert all("non local key" in line for line in report["today"]), report["today"]
    first, second = report["partitions"]
    assert first["node"] != second["node"]
    for row in (first, second):
        assert row["taken"] == row["jobs"] == 40
        assert row["events"] == [("QUEUED", "STARTED", "RESULT", "DONE")]
        assert row["rq_status"] == ["finished"]
        assert row["rq_job_fetch"].startswith("no:")  # rq refuses a job id holding a hash tag
