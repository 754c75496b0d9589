"""README's Python API snippet runs as written, and the README keeps its two commands."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(title: str) -> str:
    text = README.read_text()
    section = text[text.index(title):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_block("## Python API in 15 lines"), "README", "exec"), scope)
    assert (tmp_path / "zo.pt").exists()
    assert scope["opt"].step_count == 100


def test_ci_runs_the_readme_test_command():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in text and ".venv/bin/python -m pytest -q" in ci
    assert ".venv/bin/zoengine train" in text
