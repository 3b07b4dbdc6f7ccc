"""Shared fixtures: one Ray session for the whole run, one Serve app per module, an offline engine.

Everything a test starts it stops: Serve apps by name, the Ray session it started, engines by handle.
The session ends with a check that nothing new was left in /dev/shm.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import serve_env
from app.config import DEFAULT_MODEL_DIR
from app.engine import engine_env

for _key, _value in engine_env().items():  # the offline reference engine runs in this process
    os.environ.setdefault(_key, _value)
serve_env.apply()  # every cluster the tests start (here or in a subprocess) runs Serve as pdserve ships it

MODEL_DIR = str(DEFAULT_MODEL_DIR)
MODEL_NAME = "pdserve-tiny-llama"
_SHM = Path("/dev/shm")


def _shm_entries() -> set[str]:
    return set(os.listdir(_SHM)) if _SHM.exists() else set()


_SHM_AT_START = _shm_entries()


free_port = serve_env.free_port  # what tests import from here


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[int]:
    """A local Ray cluster with Serve listening on a free loopback port; yields the port."""
    import ray
    from ray import serve

    started_here = not ray.is_initialized()
    if started_here:
        # Autoscaling signals every 0.5 s instead of 10 s, and metrics exported every second, so that
        # scaling and scrape tests finish in bounded time (the processes Ray starts inherit these).
        os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
        os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
        # More logical CPUs than cores: replicas reserve 1 CPU each but mostly wait on each other.
        ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False, namespace="pdserve-tests",
                 _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve_env.shutdown_serve()
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(ray_session) -> str:
    """This node's Prometheus endpoint (Ray's metrics export port)."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


@pytest.fixture(scope="session")
def driver():
    """pdserve's `EngineDriver` run directly in this process (no Serve): what tests/test_engine.py tests."""
    from app.config import AppConfig
    from app.engine import EngineDriver
    from app.specs import EngineSpec

    driver = EngineDriver.from_spec(EngineSpec.from_config(AppConfig()))
    yield driver
    driver.shutdown()


@pytest.fixture(scope="session")
def offline_engine(ray_session):
    """The reference for token-exact tests: vLLM's own `LLM` class with the app's engine knobs, in an actor of its
    own (one in-process engine per process). Nothing of pdserve's request path is in it, so a bug there cannot
    hide on both sides of a comparison."""
    from tests.helpers import ReferenceLLM

    reference = ReferenceLLM()
    yield reference
    reference.shutdown()


def pytest_sessionfinish(session, exitstatus):
    left = _shm_entries() - _SHM_AT_START
    if left:
        print(f"\n/dev/shm entries left by the test run: {sorted(left)}")
        session.exitstatus = 1
