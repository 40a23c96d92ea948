"""Content-addressed artifact cache with atomic writes.

An artifact lives in ``WORKDIR/objects/<kind>/<key>/``: NumPy arrays as ``.npy`` files (so
big ones can be memory-mapped and written in a stream), a checkpoint as ``model.pt``, and
``meta.json`` with the configs it was made from. It is written in a temporary folder beside
the final one and renamed into place, so a killed process or two concurrent writers never
leave a half-written artifact: the first complete rename wins and the other copy is dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CfdebugError


def stable_hash(*parts) -> str:
    """A short hex digest of JSON-serialisable ``parts`` (dict order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (used for user checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:20]


class Store:
    """The artifact cache under ``workdir``."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir)
        try:
            (self.root / "objects").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CfdebugError(
                f"Cannot create the work directory {self.root}: {exc.strerror}. "
                "Pass a writable folder with `--workdir` or set CFDEBUG_HOME."
            ) from exc

    def path(self, kind: str, key: str) -> Path:
        return self.root / "objects" / kind / key

    def exists(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / "meta.json").is_file()

    @contextmanager
    def writer(self, kind: str, key: str, meta: dict) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it becomes the artifact atomically.

        On an exception the temporary folder is removed and nothing is left behind.
        """
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            _write_json(tmp / "meta.json", meta)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process finished the same artifact first; both are identical by key.
                if not self.exists(kind, key):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def save_arrays(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        with self.writer(kind, key, meta) as tmp:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.asarray(array))
        return self.path(kind, key)

    def load_arrays(self, kind: str, key: str, mmap: bool = False) -> tuple[dict[str, np.ndarray], dict]:
        folder = self.path(kind, key)
        meta = self.load_meta(kind, key)
        arrays = {
            p.stem: np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
            for p in sorted(folder.glob("*.npy"))
        }
        return arrays, meta

    def load_meta(self, kind: str, key: str) -> dict:
        with open(self.path(kind, key) / "meta.json") as handle:
            return json.load(handle)


def json_default(value):
    """JSON for NumPy arrays and scalars (as lists and numbers), paths and the rest as text."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def jsonable(value):
    """Plain JSON types, recursively: dict keys as text, tuples and arrays as lists, NumPy
    scalars as Python numbers, and NaN/inf as ``None`` (``--json`` output, registry results)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, payload: dict) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True, default=json_default)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` atomically.

    The one atomic writer for single files (run configs, results, checkpoints, ``--json`` and
    ``--csv`` outputs): the file is synced, then renamed over ``path`` with ``os.replace``, so a
    reader sees the old file or the new one, never half of one. On an exception the temporary
    file is removed and ``path`` is untouched. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write JSON to ``path`` atomically (for user-named outputs)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=json_default))


def torch_save_atomic(payload, path: str | Path) -> None:
    """``torch.save(payload)`` to ``path`` atomically (checkpoints, ``model.pt``)."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
