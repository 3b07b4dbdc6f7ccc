"""`app/serve_env.py`: pdserve's Serve settings are set before a cluster starts unless the environment says
otherwise, every cluster `apply()` prepares gets HTTP-ingress ports of its own, and what a cluster was started
without is named (the ingress logs it)."""

from __future__ import annotations

import logging

import pytest

from app import cli, serve_env


@pytest.fixture
def clean_env(monkeypatch):
    for key in (*serve_env.SERVE_ENV, *serve_env.CLUSTER_PORTS, serve_env.PICKED_PORTS):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_apply_sets_what_is_unset_and_keeps_an_operators_choice(clean_env):
    assert serve_env.missing() == [f"{key}={value}" for key, value in serve_env.SERVE_ENV.items()]
    serve_env.apply()
    assert serve_env.missing() == []
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # an operator's A/B: kept, and reported
    serve_env.apply()
    assert serve_env.missing() == ["RAY_SERVE_ENABLE_HA_PROXY=1"]


def test_each_cluster_gets_ports_of_its_own_but_an_operators_port_is_kept(clean_env):
    import os

    clean_env.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the operator's
    serve_env.apply()
    first = {key: os.environ[key] for key in serve_env.CLUSTER_PORTS}
    assert first["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert len(set(first.values())) == len(first)
    # a child process inherits this environment and starts a second cluster beside the first: apply() there
    # picks new ports for what the first apply() picked, not for what the operator set
    serve_env.apply()
    second = {key: os.environ[key] for key in serve_env.CLUSTER_PORTS}
    assert second["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert all(second[key] != first[key] for key in serve_env.CLUSTER_PORTS if key != "RAY_SERVE_HAPROXY_STATS_PORT")


def test_serve_env_command_prints_the_settings_with_the_environments_values_winning(clean_env, capsys):
    clean_env.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")
    cli.main(["serve-env"])
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert printed == {**serve_env.SERVE_ENV, "RAY_SERVE_PROXY_USE_GRPC": "0"}


def test_the_ingress_warning_names_the_missing_setting(clean_env, caplog):
    serve_env.apply()
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    with caplog.at_level(logging.WARNING, logger="app.serve_env"):
        serve_env.log_missing()
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in caplog.text
    caplog.clear()
    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    serve_env.log_missing()
    assert caplog.text == ""


def test_haproxy_files_of_the_given_nodes_are_removed_and_no_others(clean_env, tmp_path):
    clean_env.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(tmp_path / "haproxy.cfg"))
    for node in ("ours", "theirs"):
        (tmp_path / node).mkdir()
        (tmp_path / node / "haproxy.cfg").write_text("global\n")
    assert serve_env.haproxy_node_dirs() == {"ours", "theirs"}  # what a benchmark compares around its `serve run`
    serve_env.remove_haproxy_files(["ours", ""])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]
    assert serve_env.haproxy_node_dirs() == {"theirs"}


def test_a_picked_port_is_free_and_outside_the_ranges_ray_and_the_kernel_pick_from(monkeypatch):
    import socket

    monkeypatch.setattr(serve_env, "_ephemeral_floor", lambda: 32768)
    for _ in range(20):
        port = serve_env.free_port()
        assert serve_env.QUIET_PORTS[0] <= port <= serve_env.QUIET_PORTS[1]
        with socket.socket() as sock:
            sock.bind(("", port))  # free on every interface, as HAProxy binds it
    low = serve_env.QUIET_PORTS[0]
    monkeypatch.setattr(serve_env.random, "randint", lambda a, b: low)
    assert serve_env.free_port(avoid=[low]) != low  # a port already handed out is not handed out again
    # a machine whose ephemeral range starts below the quiet range: the kernel's pick, which is at least free now
    monkeypatch.setattr(serve_env, "_ephemeral_floor", lambda: 1024)
    assert serve_env.free_port() != low
