"""Multi-node: pdserve on a four-node Ray cluster on this machine (tests/multinode_drill.py, in a process of its
own because it starts its own cluster): replicas placed on their nodes by `resources`, KV pairs across nodes on
their sockets, replies equal to the collocated app's, and a decode node lost without losing the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_pdserve_across_nodes_places_by_resources_matches_collocated_and_survives_a_lost_node():
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own cluster, never the test session's
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_drill.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0:  # the drill's own report in full (its timeline says which request failed, and when)
        pytest.fail(f"drill exited {run.returncode}: {lines[-1] if lines else 'no report'}\n{run.stderr[-3000:]}",
                    pytrace=False)
    seen = json.loads(lines[-1])
    assert seen["kv_sources"] == ["transfer"] and seen["decode_replicas"] == 2  # both cross-node pairs used
    assert seen["served_after_loss"] == 8
