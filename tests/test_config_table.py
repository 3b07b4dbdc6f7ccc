"""The README's configuration table is the one `pdserve config-table` generates from the config models."""

from __future__ import annotations

from app.config import REPO_ROOT, AppConfig
from app.tools.config_table import config_table, readme_table


def test_readme_table_is_generated_from_the_models():
    readme = readme_table((REPO_ROOT / "README.md").read_text())
    assert readme, "README.md lost its config-table section"
    assert readme == config_table(), "README.md's configuration table is stale: run `pdserve config-table --write`"


def test_table_shows_every_key_with_its_model_default():
    table = config_table()
    assert "| `mode` | `disaggregated` |" in table and AppConfig().mode == "disaggregated"
    assert "| `kv_transfer.timeout_s` | `1.0` |" in table
    assert "| `<deployment>.num_cpus` | `1.0` (ingress: `0.1`) |" in table
    for name in AppConfig.model_fields["autoscaling"].annotation.model_fields:
        assert f"`autoscaling.{name}." in table
