"""The Grafana dashboard and the README's metrics table agree with what the app exports (app/metrics.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.metrics import METRICS

ROOT = Path(__file__).resolve().parent.parent
# Prometheus names as Ray exports them: ray_<name>, histograms as _bucket/_sum/_count series.
_EXPORTED = re.compile(r"\bray_(pdserve_[a-z0-9_]+?)(?:_bucket|_sum|_count)?\b")


def _panels() -> list[dict]:
    return json.loads((ROOT / "dashboards" / "pdserve.json").read_text())["panels"]


def test_dashboard_is_valid_json_with_prometheus_panels():
    panels = _panels()
    assert panels and len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["type"] == "prometheus"
        assert all(t["expr"].strip() and t["refId"] for t in panel["targets"])


def test_every_panel_query_names_an_exported_metric_and_every_metric_has_a_panel():
    used: set[str] = set()
    for panel in _panels():
        for target in panel["targets"]:
            names = set(_EXPORTED.findall(target["expr"]))
            assert names, f"{panel['title']}: {target['expr']} names no pdserve metric"
            assert names <= set(METRICS), f"{panel['title']}: unknown {names - set(METRICS)}"
            assert not re.search(r"\bpdserve_", _EXPORTED.sub("", target["expr"])), target["expr"]
            used |= names
    assert used == set(METRICS), f"metrics without a panel: {set(METRICS) - used}"


def test_histogram_quantiles_use_bucket_series_of_histograms():
    for panel in _panels():
        for target in panel["targets"]:
            for name in re.findall(r"ray_(pdserve_[a-z0-9_]+)_bucket", target["expr"]):
                assert METRICS[name].kind == "Histogram", name


def test_readme_documents_every_metric_with_its_labels_and_unit():
    readme = (ROOT / "README.md").read_text()
    for metric in METRICS.values():
        row = next((line for line in readme.splitlines() if f"`ray_{metric.name}`" in line), None)
        assert row is not None, f"README has no row for ray_{metric.name}"
        assert metric.unit in row and all(tag in row for tag in metric.tags), row
