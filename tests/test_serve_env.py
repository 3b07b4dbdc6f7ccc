"""`app/serve_env.py`: pdserve's Serve settings are set before a cluster starts unless the environment says
otherwise, and what a cluster was started without is named (the ingress logs it)."""

from __future__ import annotations

import logging

from app import serve_env


def test_apply_sets_what_is_unset_and_keeps_an_operators_choice(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_PROXY_USE_GRPC", raising=False)
    assert serve_env.missing() == ["RAY_SERVE_PROXY_USE_GRPC=1"]
    serve_env.apply()
    assert serve_env.missing() == []
    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")  # an operator's A/B: kept, and reported
    serve_env.apply()
    assert serve_env.missing() == ["RAY_SERVE_PROXY_USE_GRPC=1"]


def test_the_ingress_warning_names_the_missing_setting(monkeypatch, caplog):
    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")
    with caplog.at_level(logging.WARNING, logger="app.serve_env"):
        serve_env.log_missing()
    assert "RAY_SERVE_PROXY_USE_GRPC=1" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "1")
    serve_env.log_missing()
    assert caplog.text == ""
