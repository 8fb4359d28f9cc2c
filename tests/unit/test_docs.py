"""The README and docs/ stay true: short, linked, dated, and in step with the code they describe."""

import re
import subprocess
from pathlib import Path

import pytest

from pipeline.config import _ENV, Settings
from pipeline.errors import RecsysError

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").rglob("*.md"))
# what a diary says; split so that this file does not match itself
DIARY = re.compile(r"\b(sess" r"ion [0-9]+|to" r"night)\b", re.IGNORECASE)
TREES = ("src", "dags", "plugins", "tests", "docs", "bench")


def _markdown_pages() -> list[Path]:
    return [README, *DOCS]


def test_the_readme_is_short():
    assert len(README.read_text()) < 15_000


def test_no_diary_in_code_docs_or_readme():
    files = [README, *(p for tree in TREES for p in (REPO / tree).rglob("*")
                       if p.is_file() and p.suffix in {".py", ".md", ".cfg", ".toml", ".json", ".yaml"})]
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()[:80]}" for p in files
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), start=1) if DIARY.search(line)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)} links to missing files: {broken}"


def test_the_docs_index_lists_every_page():
    index = (REPO / "docs" / "index.md").read_text()
    for page in (REPO / "docs").glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, page.name


def test_every_setting_is_documented_with_its_environment_variables():
    page = (REPO / "docs" / "configuration.md").read_text()
    table = page[page.index("## Settings"):]
    table = table[:table.index("\n## ")]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `")}
    documented = {re.match(r"`(\w+)`", key).group(1): line for key, line in rows.items()}
    for name, variables in _ENV.items():
        assert name in documented, f"setting {name} is missing from docs/configuration.md"
        for variable in variables:
            assert f"`{variable}`" in documented[name], (name, variable)
    assert set(documented) <= {f.name for f in Settings.__dataclass_fields__.values()}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_exit_code_is_in_the_errors_page():
    page = (REPO / "docs" / "errors.md").read_text()
    codes = {int(m) for m in re.findall(r"^\| (\d+) \|", page, flags=re.MULTILINE)}
    for cls in _subclasses(RecsysError):
        assert cls.exit_code in codes, (cls.__name__, cls.exit_code)
        if "exit_code" in cls.__dict__:
            assert f"`{cls.__name__}`" in page, cls.__name__


def _results_rows() -> list[list[str]]:
    text = README.read_text()
    section = text[text.index("## Results at a glance"):]
    section = section[:section.index("\n## ", 3)]
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_every_figure_in_the_results_table_carries_its_commit_and_date():
    rows = _results_rows()
    assert len(rows) >= 5
    for row in rows:
        assert re.fullmatch(r"[0-9a-f]{7,12}, 20\d\d-\d\d-\d\d", row[-1]), row


def test_the_results_table_names_commits_of_this_repository():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for commit in {row[-1].split(",")[0] for row in _results_rows()}:
        found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                               capture_output=True)
        assert found.returncode == 0, f"README cites commit {commit}, which this repository does not hold"
