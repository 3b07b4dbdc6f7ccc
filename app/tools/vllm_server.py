"""vLLM's own OpenAI server, started as its users start it: the reference pdserve's API is checked against.

Life cycle: `VLLMServer(...)` builds the command line (`python -m vllm.entrypoints.openai.api_server`, the
engine knobs pdserve's defaults use); `start()` launches it in a session of its own and waits until
`/v1/models` answers; `stop()` presses Ctrl-C (it then exits in seconds and cleans up after itself), waits for
the rest of its session (engine core, resource tracker) to exit, kills its process group if anything lingers,
and removes the /dev/shm files its processes had mapped that a kill left behind (only those: other programs'
shared memory is never touched). For servers whose processes it cannot name (Ray Serve's replicas, which run
vLLM's engines in processes of their own), `remove_leftover_shm` removes what appeared since a snapshot
(`shm_entries`) and no live process holds.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.config import DEFAULT_MODEL_DIR
from app.engine_setup import engine_env


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and os.getpgid(int(proc.name)) == pgid:
                pids.append(int(proc.name))
        except (OSError, IndexError):
            continue  # gone meanwhile
    return pids


def _shm_of_group(pgid: int) -> set[Path]:
    """/dev/shm files mapped or open in the processes of process group `pgid`."""
    found: set[Path] = set()
    for pid in _group_pids(pgid):
        proc = Path("/proc", str(pid))
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    found.add(Path(line.split(maxsplit=5)[-1]))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    found.add(Path(target))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def wait_ready(process: subprocess.Popen, base_url: str, timeout_s: float = 240, poll_s: float = 0.5) -> float:
    """Seconds until an OpenAI server started as `process` answers `/v1/models` (either server: vLLM's, pdserve)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"server not ready in {timeout_s} s")


def default_sigint() -> None:
    # A process started from a background job inherits SIGINT ignored; Ctrl-C must reach the server.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class VLLMServer:
    port: int
    model: str = str(DEFAULT_MODEL_DIR)
    served_name: str = "pdserve-tiny-llama"
    max_model_len: int = 4096
    block_size: int = 32
    kv_cache_memory_bytes: int = 256 << 20
    log: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--served-model-name", self.served_name, "--dtype", "float32",
                "--max-model-len", str(self.max_model_len), "--block-size", str(self.block_size), "--enforce-eager",
                # without it, its memory check refuses to start on a small CPU machine
                "--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes),
                "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, timeout_s: float = 240) -> float:
        """Start it and wait until it answers; returns seconds to ready."""
        env = {**os.environ, **engine_env()}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # its engine core runs as in any vLLM deployment
        out = self.log.open("w") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=default_sigint)
        try:
            return wait_ready(self.process, self.base_url, timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"vLLM's server: {exc}" + (f"; see {self.log}" if self.log else "")) from None

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        shm = _shm_of_group(process.pid)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        # The server's exit is not the end of its session: its engine core and multiprocessing's resource tracker
        # (which unlinks the semaphores and shared memory the server registered, some made during shutdown) exit
        # after it. Let them finish before anything is killed, and note what they still hold.
        deadline = time.monotonic() + 15
        while _group_pids(process.pid) and time.monotonic() < deadline:
            shm |= _shm_of_group(process.pid)
            time.sleep(0.2)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything of its session still there (engine core)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)
        for path in shm:
            path.unlink(missing_ok=True)

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ray_serve_llm_available() -> str | None:
    """None if Ray Serve LLM (the other baseline the benchmarks run) can run here, else why not."""
    missing = [m for m in ("pyarrow", "jsonref") if importlib.util.find_spec(m) is None]
    return f"missing {', '.join(missing)}: pip install -e '.[raysllm]'" if missing else None


SHM = Path("/dev/shm")


def shm_entries() -> set[str]:
    """The names in /dev/shm now (a benchmark's snapshot before it starts its servers)."""
    return set(p.name for p in SHM.iterdir()) if SHM.is_dir() else set()


def remove_leftover_shm(before: set[str]) -> list[str]:
    """Remove /dev/shm entries this run created and no live process holds (vLLM's multiprocess engines, killed
    with their replicas, leave their shared-memory queues behind)."""
    held: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
            maps = (proc / "maps").read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile (one fd gone must not hide the process's other files)
                continue
            if target.startswith("/dev/shm/"):
                held.add(Path(target).name)
        held |= {line.split("/dev/shm/")[1].split()[0] for line in maps.splitlines() if "/dev/shm/" in line}
    removed = sorted(shm_entries() - before - held)
    for name in removed:
        (SHM / name).unlink(missing_ok=True)
    return removed
