"""Commands run from the repository root, where the root is on sys.path.

`python -m pytest`, `python -m zoengine` and `torchrun -m zoengine` put the root first on
sys.path, so a top-level folder that is a regular package shadows any installed distribution of
the same name. transformers 5.25 imports Hugging Face's `kernels`; the old top-level `kernels/`
package made all three commands fail at import. These are the only tests that start a child in
the root on purpose; every other child runs in a temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import runpy
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECK = ROOT / ".ci" / "check_shadowing.py"


def _from_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def real_kernels():
    """The real `kernels` distribution must be installed, or these tests prove nothing."""
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's `kernels` is not installed (pip install -e '.[dev]' has it)")


def test_transformers_imports_from_the_root(real_kernels):
    r = _from_root("-c", "import transformers, kernels; from transformers import GPT2LMHeadModel; "
                         "print(kernels.__file__)")
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(ROOT / "kernels") not in r.stdout  # the installed package, not our folder


def test_python_dash_m_zoengine_from_the_root(real_kernels):
    r = _from_root("-m", "zoengine", "--help")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train" in r.stdout


def test_torchrun_dash_m_zoengine_from_the_root(real_kernels):
    """torchrun's worker runs `python -m zoengine` with the root first on sys.path too."""
    r = _from_root("-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone",
                   "-m", "zoengine", "--help")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "train" in r.stdout


def test_pytest_collects_from_the_root(real_kernels):
    # -n 0: the collection in this one `python -m pytest` process (root first on sys.path),
    # instead of addopts' two xdist workers each importing every test module (twice the time;
    # a worker, started with `python -c` in the root, has the same sys.path[0])
    r = _from_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-n", "0")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert " error" not in r.stdout.lower()
    assert "tests collected" in r.stdout or "tests/" in r.stdout


def test_no_folder_on_the_path_shadows_an_installed_package():
    clashes = runpy.run_path(str(CHECK))["clashes"]
    assert clashes(str(ROOT)) == []


def test_the_shadowing_check_catches_a_clash(tmp_path):
    """The guard must be able to fail: a regular package named like an installed one."""
    clashes = runpy.run_path(str(CHECK))["clashes"]
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "torch.py").write_text("")
    (tmp_path / "kernels").mkdir()  # no __init__.py: a namespace portion, allowed
    found = clashes(str(tmp_path))
    assert len(found) == 2
    assert found[0].startswith("numpy shadows") and found[1].startswith("tests/torch shadows")
