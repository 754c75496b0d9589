"""The names a run folder reserves for itself (``RunFolder``, zoengine.storage.folder): the
manifest, the lock, the journal, ``run.json`` and the checkpoints' folder. No final output may
take one of them."""

from __future__ import annotations

from zoengine.storage.lock import LOCK_NAME
from zoengine.storage.manifest import MANIFEST

CHECKPOINTS, JOURNAL, RUN_CONFIG = "checkpoints", "journal.zoj", "run.json"
RESERVED = {MANIFEST, LOCK_NAME, CHECKPOINTS, JOURNAL, RUN_CONFIG}
