"""`app/tools/bench/processes.py`: a system's processes are found by session and named by role, their CPU is summed
per role, and `Profiler` leaves one flame graph per profiled process (what `benchmarks/overhead.py --profile` uses)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from app.tools.bench.processes import OTHER, Profiler, cpu_by_role, py_spy

# A stand-in "replica": a busy Python process whose command line names a deployment, as Ray names Serve replicas.
BUSY = "import time\nend = time.time() + 30\nwhile time.time() < end: sum(range(1000))\n# ServeReplica:app:Ingress"


@pytest.fixture
def system():
    """A busy ingress stand-in and an idle helper, in a session of their own (as overhead.py starts a system)."""
    command = f"sleep 30 & exec {shlex.quote(sys.executable)} -c {shlex.quote(BUSY)}"
    ingress = subprocess.Popen(["bash", "-c", command], start_new_session=True)
    cmdline = f"/proc/{ingress.pid}/cmdline"
    deadline = time.monotonic() + 10
    while b"ServeReplica" not in open(cmdline, "rb").read() and time.monotonic() < deadline:
        time.sleep(0.05)  # until bash has become Python
    time.sleep(0.5)  # and Python has started (py-spy reads its version from the running interpreter)
    yield ingress.pid
    os.killpg(ingress.pid, signal.SIGKILL)  # its own process group: the stand-in and its helper
    ingress.wait()


def test_cpu_is_summed_by_role_within_the_session(system):
    time.sleep(1.0)
    cpu = cpu_by_role(system)
    assert set(cpu) == {"ingress"} | ({OTHER} if OTHER in cpu else set())  # the helper is there; nothing else is
    assert cpu["ingress"] > 0.05  # a busy loop for over a second (on a machine that may be busy too)
    assert cpu_by_role(system + 10_000_000) == {}  # no process of another session is counted


@pytest.mark.skipif(py_spy() is None, reason="py-spy is not installed")
def test_profiler_writes_a_flame_graph_of_each_profiled_process(system, tmp_path):
    with Profiler(system, ("ingress", "decode replica"), tmp_path, "demo") as profiler:
        time.sleep(1.5)
    assert [path.name for path in profiler.paths] == ["demo-ingress.svg"]  # no decode process, no graph
    assert "&lt;module&gt; (&lt;string&gt;:3)" in profiler.paths[0].read_text()  # the busy loop was sampled
