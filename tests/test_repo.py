"""The repository is self-contained: what the demo, the examples and the tests read ships in it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "runs", "bench", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and not (set(rel.parts) & SKIP) and not rel.parts[0].endswith(".egg-info"):
            out.append(path)
    return out


def test_nothing_outside_bench_reads_a_sibling_folder():
    sibling = "../" + "shared"  # spelled in two pieces so that this file does not match itself
    found = [str(p.relative_to(ROOT)) for p in _files() if sibling.encode() in p.read_bytes()]
    assert found == []


def test_every_example_reads_data_that_ships():
    for example in sorted((ROOT / "examples").rglob("*.yaml")):
        if example.parent.name == "accelerate":  # launcher configs (tests/test_fsdp.py)
            continue
        raw = yaml.safe_load(example.read_text())
        for task in raw["tasks"]:
            for split in ("train", "dev", "test"):
                path = task["data"].get(split)
                if path is not None:
                    assert (ROOT / path).is_file(), (example.name, task["name"], path)
                    rows = (ROOT / path).read_text(encoding="utf-8").splitlines()
                    assert rows and all(isinstance(json.loads(r), dict) for r in rows)


def test_shipped_data_is_small_and_documented():
    data = ROOT / "examples" / "data"
    assert sum(p.stat().st_size for p in data.rglob("*") if p.is_file()) < 5 * 2**20
    for task in data.iterdir():
        source = (task / "SOURCE.md").read_text(encoding="utf-8")
        assert "License" in source or "Licence" in source or "licence" in source, task.name
        assert "| train |" in source, task.name


def test_every_relative_link_of_the_docs_leads_to_a_file():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_readme_is_a_front_door():
    """The README stays short; the details live in docs/ (one page per subject)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, len(lines)
    assert "make demo" in lines[7] and "make test" in lines[8]


def test_every_example_config_validates():
    import os

    from multitune.config import load_config

    here = os.getcwd()
    os.chdir(ROOT)  # example paths are relative to the repository root
    try:
        for example in sorted((ROOT / "examples").rglob("*.yaml")):
            if example.parent.name == "accelerate":  # launcher configs (tests/test_fsdp.py)
                continue
            cfg = load_config(example.relative_to(ROOT))
            assert cfg.tasks, example
    finally:
        os.chdir(here)
