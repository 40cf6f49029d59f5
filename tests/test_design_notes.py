"""The design notes that code and documents cite ("DESIGN.md section N") are in the repository."""

import re
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
CITING_FOLDERS = ("qac_diffusers", "pipelines", "benchmarks", "tests", "model_cards")
CITATION = re.compile(r"DESIGN\.md section (\d+)")


def citing_files() -> list[Path]:
    files = [REPO_ROOT / "README.md", REPO_ROOT / "train_qac.py"]
    for folder in CITING_FOLDERS:
        files += sorted((REPO_ROOT / folder).rglob("*.py")) + sorted((REPO_ROOT / folder).rglob("*.md"))
    return files


def test_every_cited_section_exists():
    sections = set(re.findall(r"^## (\d+)\. ", (REPO_ROOT / "DESIGN.md").read_text(encoding="utf-8"), re.MULTILINE))
    citations = {
        (str(path.relative_to(REPO_ROOT)), number)
        for path in citing_files()
        for number in CITATION.findall(path.read_text(encoding="utf-8"))
    }
    assert citations, "no citation found: the pattern or the file list is out of date"
    assert sorted(citation for citation in citations if citation[1] not in sections) == []
