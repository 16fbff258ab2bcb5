"""docs/model-zoo.md: the task tables are rebuilt from their rows; the page's other sections stay."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import zoo


def test_rendering_the_zoo_rebuilds_the_tables_and_keeps_the_other_sections(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "DOCS", tmp_path)
    notes = ("## Out of domain and calibration (served models)\n\n| model | set | accuracy |\n"
             "|---|---|---:|\n| mnist | UCI digits | 95.94% |\n\n**A retrain, not shipped.** Seeds 0-2.")
    (tmp_path / "model-zoo.md").write_text(
        "# Model zoo\n\n## Images: MNIST digits\n\n| an old table |\n\n" + notes + "\n")
    row = zoo.ZooRow("CNN", 1234, 0.9955, 120.0, 2_000_000, 0.3, 5.0, served=True, measured_with="CPU X")
    zoo.save_rows("image-mnist", [row])  # renders
    zoo.save_rows("image-mnist", [row])  # and again: nothing doubles
    page = (tmp_path / "model-zoo.md").read_text()
    assert "an old table" not in page
    assert page.count("## Images: MNIST digits") == 1
    assert "| **CNN** (served) | 1,234 | 99.55% | 2.0 min | 2.00 MB | 0.300 ms | 5.000 ms |" in page
    assert page.count(notes) == 1
    assert page.index("## Images: MNIST digits") < page.index(notes)
