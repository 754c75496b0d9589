"""Optional dependencies: the extras of ``pip install "zoengine[...]"`` and a clear error when
one a feature needs is missing.

The optimizers need only torch and numpy; these packages serve particular front ends and are
imported only where those run (docs/design.md, "Extras"). Standard library only (layer 0).
"""

from __future__ import annotations

import importlib.util

# extra -> the distributions it installs, each imported under its own name (pyproject.toml's
# [project.optional-dependencies] lists the same; tests/test_config.py checks)
EXTRAS = {
    "lora": ("peft",),  # --train lora / --lora, zoengine merge, eval of a LoRA adapter
    "plot": ("matplotlib",),  # curve.png of zoengine train, hwsim --plot
    "gguf": ("gguf", "accelerate"),  # the embedded SmolLM2 (a GGUF file; transformers' loader)
    "hf": ("accelerate", "peft"),  # ZOTrainer: transformers' Trainer needs accelerate
}


class MissingDependency(ImportError):
    """A feature needs a package of an extra that is not installed."""

    def __init__(self, package: str, extra: str, what: str):
        super().__init__(f"{what} needs {package}, which is not installed: "
                         f'pip install "zoengine[{extra}]"', name=package)
        self.package, self.extra = package, extra


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken entry
        return False


def require(package: str, extra: str, what: str) -> None:
    """Raise ``MissingDependency`` naming ``extra`` unless ``package`` can be imported."""
    if package not in EXTRAS[extra]:
        raise ValueError(f"extra {extra!r} does not install {package!r}")
    if not installed(package):
        raise MissingDependency(package, extra, what)
