"""The optimizer keywords on their way out, and the warning that names their replacement.

The engine features (journal, data parallel, virtual perturbation) became attach-calls
(docs/design.md item 22); their constructor keywords still work for one release.
"""

from __future__ import annotations

import sys
import warnings

# keyword -> (default, the replacement the warning names)
ENGINE_KEYWORDS = {
    "journal": (None, "opt.set_journal(path)"),
    "journal_fsync": ("step", "opt.set_journal(path, fsync=...)"),
    "distributed": (None, "opt.set_distributed(mode)"),
    "perturbation": ("inplace", "opt.attach_virtual(model) (in place is the default)"),
    "model": (None, "opt.attach_virtual(model)"),
}


def warn_outside(message: str, category: type[Warning] = DeprecationWarning) -> None:
    """``warnings.warn``, attributed to the first caller outside ``zoengine.optim`` (the
    user's line, or the zoengine module that still uses a deprecated spelling)."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("zoengine.optim"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def engine_keywords(cls_name: str, given: dict) -> dict:
    """The deprecated engine keywords of a constructor call, with their defaults; warns
    (``DeprecationWarning``) for each one given and refuses any other keyword as Python
    would."""
    for k in given:
        if k not in ENGINE_KEYWORDS:
            raise TypeError(f"{cls_name}.__init__() got an unexpected keyword argument {k!r}")
        warn_outside(f"the optimizer keyword {k}= is deprecated and will be removed in the "
                     f"next release: use {ENGINE_KEYWORDS[k][1]}")
    return {k: given.get(k, default) for k, (default, _) in ENGINE_KEYWORDS.items()}
