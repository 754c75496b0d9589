"""The manifest: one checksummed JSON file that names the files of a folder's last completed
save with their sizes and SHA-256.

It is written last (temp file, fsync, ``os.replace``, fsync of the folder), so it always
describes a save that is complete on disk; a reader trusts only the files it names, and only
when their size and SHA-256 match. Layout::

    {"format": "zoengine-manifest/1", "sha256": <of the canonical JSON of body>, "body": {
        "kind": "run" | "model", "generation": n, "files": {relpath: {"size", "sha256"}},
        "pending": {"staged": {name: temp name}, "obsolete": [names]} (only mid-commit), ...}}

``pending.staged`` (a commit in progress, docs/reliability.md): the new content of a top-level
name may still sit under its temp name; ``locate`` looks there first.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time

from zoengine.faults import crashpoint
from zoengine.hashing import sha256_file
from zoengine.storage.fsio import fsync_dir, tmp_name, write_bytes

MANIFEST = "manifest.json"
FORMAT = "zoengine-manifest/1"


class IntegrityError(ValueError):
    """A file does not match its manifest, or the manifest is damaged; the message names the
    file. ``flag``: the command-line flag that named the folder, when there is one."""

    def __init__(self, message: str, *, path: str | None = None, flag: str | None = None):
        super().__init__(message)
        self.path = path
        self.flag = flag


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode(body: dict) -> bytes:
    """The manifest file's bytes: the body and the SHA-256 of its canonical JSON."""
    doc = {"format": FORMAT, "sha256": hashlib.sha256(_canonical(body)).hexdigest(),
           "body": body}
    return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def read_manifest(folder: str) -> dict | None:
    """The verified body of ``folder``'s manifest; None when it has none. A damaged manifest
    (not JSON, another format, a checksum that does not match) raises ``IntegrityError``."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{path}: damaged (not valid JSON); nothing in {folder} can be "
                             "trusted", path=path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(
            doc.get("body"), dict):
        raise IntegrityError(f"{path}: not a zoengine manifest (format {FORMAT!r} expected)",
                             path=path)
    if hashlib.sha256(_canonical(doc["body"])).hexdigest() != doc.get("sha256"):
        raise IntegrityError(f"{path}: damaged (its checksum does not match its content); "
                             f"nothing in {folder} can be trusted", path=path)
    return doc["body"]


def write_manifest(folder: str, body: dict, *, crash_points: bool = True) -> None:
    """Replace ``folder``'s manifest atomically and durably (the commit point of every save).
    Stamps ``written`` (pid, host, time). ``crash_points=False``: the set-up commit of
    ``run.json`` (``RunFolder.write_run_config``), which must not shift the counts of the
    crash points the kill tests choose by number."""
    body["written"] = {"pid": os.getpid(), "host": socket.gethostname(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = os.path.join(folder, MANIFEST)
    tmp = tmp_name(path)
    try:
        write_bytes(tmp, encode(body))
        if crash_points:
            crashpoint("manifest-before-rename")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if crash_points:
        crashpoint("manifest-renamed")
    fsync_dir(folder)


def file_entry(path: str) -> dict:
    size, digest = sha256_file(path)
    return {"size": size, "sha256": digest}


def entries_of(path: str, relpath: str) -> dict[str, dict]:
    """Manifest entries for ``path`` named ``relpath``: the file, or every file under the
    folder (``relpath/sub/name``; ``relpath`` "": the folder is the root), sorted."""
    if not os.path.isdir(path):
        return {relpath: file_entry(path)}
    out = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            sub = os.path.relpath(p, path).replace(os.sep, "/")
            out[f"{relpath}/{sub}" if relpath else sub] = file_entry(p)
    return out


def names_under(body: dict, relpath: str) -> list[str]:
    """The file names in ``body`` equal to ``relpath`` or inside it."""
    rel = relpath.strip("/")
    return sorted(n for n in body.get("files", {}) if n == rel or n.startswith(rel + "/"))


def locate(folder: str, body: dict, relpath: str) -> str:
    """Where ``relpath``'s content named by ``body`` lies: under its staged temp name while a
    commit is pending and the temp still exists, else at its own name."""
    top, _, rest = relpath.partition("/")
    staged = body.get("pending", {}).get("staged", {}).get(top)
    if staged and os.path.lexists(os.path.join(folder, staged)):
        return os.path.join(folder, staged, rest) if rest else os.path.join(folder, staged)
    return os.path.join(folder, relpath)


def verify_file(folder: str, body: dict, relpath: str, *, flag: str | None = None) -> str:
    """Check one named file's size and SHA-256; returns where it lies. Raises
    ``IntegrityError`` naming the file: not named, missing, truncated, or corrupted."""
    entry = body.get("files", {}).get(relpath)
    path = locate(folder, body, relpath)
    if entry is None:
        raise IntegrityError(f"{path}: not named by {os.path.join(folder, MANIFEST)}, so not "
                             "trusted", path=path, flag=flag)
    try:
        size, digest = sha256_file(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing, though {MANIFEST} names it", path=path,
                             flag=flag) from None
    if size != entry["size"]:
        raise IntegrityError(f"{path}: truncated or altered: {size} bytes, {MANIFEST} says "
                             f"{entry['size']}", path=path, flag=flag)
    if digest != entry["sha256"]:
        raise IntegrityError(f"{path}: corrupted: its SHA-256 does not match {MANIFEST}'s "
                             f"({digest[:12]}... != {entry['sha256'][:12]}...)", path=path,
                             flag=flag)
    return path


def verify_under(folder: str, body: dict, relpath: str, *, flag: str | None = None) -> str:
    """Verify every named file at or under ``relpath`` (a file or a folder); returns where
    ``relpath`` lies. A name with no files in the manifest is refused."""
    names = names_under(body, relpath)
    if not names:
        path = locate(folder, body, relpath)
        raise IntegrityError(f"{path}: not named by {os.path.join(folder, MANIFEST)}, so not "
                             "trusted", path=path, flag=flag)
    for name in names:
        verify_file(folder, body, name, flag=flag)
    return locate(folder, body, relpath.strip("/"))
