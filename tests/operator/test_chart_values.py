"""docs/install.md's values table is generated from values.schema.json and values.yaml, and current."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from splitserve_operator import chart_values

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "splitserve"
DOC = ROOT / "docs" / "install.md"


def test_the_values_table_in_the_admin_docs_is_current() -> None:
    assert chart_values.with_values_table(DOC.read_text(), CHART) == DOC.read_text(), (
        "stale: python -m splitserve_operator.chart_values --chart charts/splitserve --doc docs/install.md"
    )
    assert chart_values.main(["--check", "--chart", str(CHART), "--doc", str(DOC)]) == 0


def test_every_value_has_a_schema_entry_with_a_description() -> None:
    """values.yaml and the schema name the same keys, so the table lists every value there is."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def check(node: dict[str, object], defaults: dict[str, object], path: str) -> None:
        properties = node["properties"]
        assert isinstance(properties, dict)
        assert set(defaults) <= set(properties), f"{path}: values without a schema entry"
        for name, child in properties.items():
            assert child.get("description"), f"{path}{name} has no description"
            if "properties" in child:
                check(child, defaults.get(name) or {}, f"{path}{name}.")  # type: ignore[arg-type]

    check(schema, values, "")


def test_a_stale_table_is_reported(tmp_path: Path) -> None:
    stale = tmp_path / "install.md"
    stale.write_text(f"{chart_values.DOC_START}\n| old |\n{chart_values.DOC_END}\n")
    assert chart_values.main(["--check", "--chart", str(CHART), "--doc", str(stale)]) == 1
    assert chart_values.main(["--chart", str(CHART), "--doc", str(stale)]) == 0
    assert "`podMonitor.labels`" in stale.read_text()
