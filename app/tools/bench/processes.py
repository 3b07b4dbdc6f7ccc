"""The processes of a running system by role, their CPU time, and py-spy profiles of them.

A system under test (vLLM's server, `serve run` of pdserve) is started in a session of its own; every process it
starts (Ray's workers included) keeps that session id, so the session names the system. Each process gets a role
from its command line (Serve replicas carry their deployment's name, Ray's proxy its class, vLLM's processes
theirs). `cpu_by_role` sums CPU seconds per role; `Profiler` records one flame graph per process of the roles asked
for while a workload runs (`py-spy record`, Python frames, sampled without stopping the process), so the CPU table
and the flame graphs come from the same processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from app.tools.vllm_server import default_sigint

# What each process of a system is, by its command line (Serve replicas name their deployment; Serve's HAProxy
# ingress is the `haproxy` binary and the actor that runs it, its fallback Python proxy a `ProxyActor`).
ROLES = (("HAProxyManager", "HAProxy"), ("haproxy", "HAProxy"), ("ProxyActor", "Serve HTTP proxy"),
         (":Ingress", "ingress"), (":Prefill", "prefill replica"),
         (":Decode", "decode replica"), (":Collocated", "collocated replica"),
         (":OpenAiIngress", "Ray Serve LLM ingress"), (":LLMServer", "Ray Serve LLM server"),
         ("VLLM::Worker", "vLLM worker"),
         ("VLLM::EngineCore", "vLLM engine core"), ("vllm.entrypoints", "vLLM API server"))
OTHER = "Ray and the rest"


def _session_processes(session: int) -> list[tuple[int, str, tuple[int, int]]]:
    """(pid, role, (user ticks, system ticks)) of every process whose session id is `session`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) != session:  # field 6 of stat: the session id
            continue
        role = next((name for key, name in ROLES if key in command), OTHER)
        found.append((int(pid), role, (int(fields[11]), int(fields[12]))))
    return found


def cpu_by_role(session: int) -> dict[str, float]:
    """CPU seconds so far of every process in `session`, summed by role."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for _, role, (user, system) in _session_processes(session):
        out[role] = out.get(role, 0.0) + (user + system) / ticks
    return out


def py_spy() -> str | None:
    """The py-spy executable of this environment (the `bench` extra), if there is one."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    """`with Profiler(session, roles, out_dir, prefix):` records a flame graph of each process of those roles for the
    duration of the block: `<out_dir>/<prefix>-<role>[-n].svg`. Sampling at 100 Hz without pausing the process costs
    a few percent of a core per process: measure without it, profile in a pass of its own."""

    def __init__(self, session: int, roles: tuple[str, ...], out_dir: Path, prefix: str, rate_hz: int = 100):
        self.session, self.roles, self.out_dir, self.prefix, self.rate_hz = session, roles, out_dir, prefix, rate_hz
        self.recorders: list[subprocess.Popen] = []
        self.paths: list[Path] = []

    def __enter__(self) -> Profiler:
        executable = py_spy()
        if executable is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy (the `bench` extra)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        by_role: dict[str, list[int]] = {}
        for pid, role, _ in sorted(_session_processes(self.session)):
            if role in self.roles:
                by_role.setdefault(role, []).append(pid)
        for role, pids in by_role.items():
            for n, pid in enumerate(pids, 1):
                suffix = f"-{n}" if len(pids) > 1 else ""
                path = self.out_dir / f"{self.prefix}-{role.replace(' ', '-')}{suffix}.svg"
                self.recorders.append(subprocess.Popen(
                    [executable, "record", "--pid", str(pid), "--rate", str(self.rate_hz), "--nonblocking",
                     "--format", "flamegraph", "--output", str(path)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=default_sigint))  # it stops on ^C
                self.paths.append(path)
        return self

    def __exit__(self, *exc: object) -> None:
        for recorder in self.recorders:
            recorder.send_signal(signal.SIGINT)  # py-spy writes the flame graph when interrupted
        for recorder in self.recorders:
            try:
                recorder.wait(timeout=60)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
        self.paths = [path for path in self.paths if path.exists()]
