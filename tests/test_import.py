"""Import hygiene: cheap import, no triton/cupy/CUDA, the package-dir mapping works anywhere."""

import subprocess
import sys

import pytest


def _run(code: str, cwd) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_import_touches_no_triton_cupy_or_cuda(tmp_path):
    out = _run(
        "import sys, zoengine, zoengine.noise, zoengine.optim, zoengine.kernels\n"
        "import torch\n"
        "print('triton' in sys.modules, 'cupy' in sys.modules, torch.cuda.is_initialized())",
        tmp_path)
    assert out == "False False False"


@pytest.mark.parametrize("module", ["zoengine.kernels", "zoengine.hwsim", "zoengine.noise"])
def test_mapped_packages_import_from_any_cwd(module, tmp_path):
    out = _run(f"import {module} as m; print(m.__name__)", tmp_path)
    assert out == module


def test_hwsim_imports_without_torch(tmp_path):
    out = _run("import sys; sys.modules['torch'] = None\n"
               "import zoengine.hwsim; print('torch' in sys.modules and sys.modules['torch'])",
               tmp_path)
    assert out == "None"


def test_public_names():
    import zoengine

    assert {"MeZO", "ZOOptimizer", "noise", "__version__"} <= set(dir(zoengine))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        zoengine.nope  # noqa: B018


def test_python_dash_m_runs_the_cli(tmp_path):
    res = subprocess.run([sys.executable, "-m", "zoengine", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "zoengine" in res.stdout


def test_every_package_folder_is_listed_for_installation():
    """pyproject's explicit ``packages`` list must name every folder with an __init__.py: a
    missing one installs fine in editable mode and is absent from a wheel (zoengine.storage
    once was)."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(root).parts)
             for p in (root / "zoengine").rglob("__init__.py")}
    assert found == listed
