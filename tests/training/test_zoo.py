"""docs/model-zoo.md: the task tables are rebuilt from their rows; the page's other sections stay."""

from __future__ import annotations

import re
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


def test_the_calibration_table_says_what_each_served_card_says() -> None:
    """docs/model-zoo.md's calibration table is written by hand from the cards; a retrained model
    must not leave it with the figures of the one served before."""
    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "model-zoo.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([a-z-]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", page, re.MULTILINE)
    cards = sorted(p.parent.name for p in (root / "models").glob("*/README.md"))
    assert sorted(name for name, *_ in rows) == cards
    for name, temperature, raw_ece, served_ece in rows:
        card = (root / "models" / name / "README.md").read_text(encoding="utf-8")
        assert f"gave T = {temperature}," in card, name
        assert re.search(rf"^\| softmax\(logits\) \| [\d.]+ \| {raw_ece} \|", card, re.MULTILINE), name
        assert re.search(rf"^\| softmax\(logits / {temperature}\) \| [\d.]+ \| {served_ece} \|", card,
                         re.MULTILINE), name


def test_the_out_of_domain_table_quotes_each_served_card() -> None:
    """Every accuracy in docs/model-zoo.md's out-of-domain table of the served models is one its
    model's card reports."""
    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "model-zoo.md").read_text(encoding="utf-8")
    section = page.split("## Out of domain and calibration (served models)", 1)[1]
    section = section.split("\n\n| model | temperature")[0]
    rows = re.findall(r"^\| ([a-z-]+)[^|]* \| [^|]+ \| ([\d.% /]+) \|", section, re.MULTILINE)
    assert len(rows) >= 8
    for name, figures in rows:
        card = (root / "models" / name / "README.md").read_text(encoding="utf-8")
        for figure in re.findall(r"[\d.]+%", figures):
            assert figure in card, (name, figure)
