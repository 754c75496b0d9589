"""README's Python API snippet runs as written, README keeps its two commands, every headline
number names the command and date that produced it, the docs index lists every page, and the
docs cite only what a reader can open (no issue numbers, no files outside the repository)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:] if end < 0 else text[start:end]


def _block(title: str) -> str:
    return re.search(r"```python\n(.*?)```", _section(title), re.S).group(1)


def test_python_api_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_block("## Python API"), "README", "exec"), scope)
    assert (tmp_path / "zo.pt").exists()
    assert scope["opt"].step_count == 100


def test_ci_runs_the_readme_test_command():
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in text and ".venv/bin/python -m pytest -q" in ci
    assert ".venv/bin/zoengine train" in text


def test_every_headline_number_has_its_command_and_date():
    rows = [line for line in _section("## Headline numbers").splitlines()
            if line.startswith("| ") and not line.startswith("| result") and "---" not in line]
    assert len(rows) >= 5
    for row in rows:
        scripts = re.findall(r"`python (benchmarks/\w+\.py)", row)
        assert scripts, f"no benchmark command in: {row[:80]}"
        assert all((ROOT / s).exists() for s in scripts), row[:80]
        assert re.search(r"\| 20\d\d-\d\d-\d\d", row), f"no date in: {row[:80]}"


def test_docs_index_lists_every_page_and_every_named_file_exists():
    index = _section("## Documentation")
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in index, f"docs/{page.name} missing from README's index"
    for page in sorted((ROOT / "docs" / "methods").glob("*.md")):
        assert page.name in index, f"docs/methods/{page.name} missing from README's index"
    text = README.read_text()
    for path in set(re.findall(r"\b((?:docs|examples|benchmarks|kernels|hwsim)/[\w/.-]*\w)", text)):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"


def test_docs_cite_only_what_a_reader_can_open():
    pages = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text()
        name = page.relative_to(ROOT)
        assert "research/" not in text, f"{name} cites a file outside the repository"
        assert "shared/DESIGN" not in text, f"{name} cites a file outside the repository"
        assert not re.search(r"\(issues? \d|\bissues? \d+\b", text, re.I), \
            f"{name} cites an issue number"
