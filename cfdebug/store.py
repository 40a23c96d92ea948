"""Content-addressed artifact cache with atomic writes.

An artifact lives in ``WORKDIR/objects/<kind>/<key>/``: NumPy arrays as ``.npy`` files (so
big ones can be memory-mapped and written in a stream), a checkpoint as ``model.pt``, and
``meta.json`` with the configs it was made from. It is written in a temporary folder beside
the final one and renamed into place, so a killed process or two concurrent writers never
leave a half-written artifact: the first complete rename wins and the other copy is dropped.
The temporary folder's name says which process fills it (pid, start time, host); opening a store
removes the ones whose process has died (a SIGKILL, a power cut), never a live writer's.

Integrity: the writer records every file's size and SHA-256 in ``manifest.json`` (written last,
so its presence also marks a complete artifact). :meth:`Store.exists` checks them before a cache
hit counts: a truncated or overwritten file, a missing manifest (an artifact from an older
cfdebug) or an unreadable one makes it warn, discard the artifact and report a miss, so the caller
recomputes it instead of loading garbage. Only the files the manifest lists are loaded. A verified
artifact is not hashed again in the same process while its files' sizes and modification times
stay the same.

A write that the disk refuses (full: ENOSPC, EDQUOT; read-only: EROFS) raises
:class:`CfdebugError` naming the path, and the space needed where it is known.
"""

from __future__ import annotations

import errno
import hashlib
import socket
import json
import math
import os
import shutil
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import CfdebugError
from .procs import pid_alive, proc_stat


def stable_hash(*parts) -> str:
    """A short hex digest of JSON-serialisable ``parts`` (dict order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (used for user checkpoints)."""
    return _sha256(path, chunk)[:20]


def _sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


MANIFEST = "manifest.json"
# Writes that fail for these reasons are the user's to fix (a full disk, a read-only workdir).
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
# The disk is full or over quota (read-only is EROFS).
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_WORKDIR_REMEDY = "pass another folder with `--workdir` / CFDEBUG_HOME"
# A temporary folder of an older cfdebug (no owner in its name) counts as abandoned after this.
_UNOWNED_TMP_AGE_S = 24 * 3600
# A file modified this close to its verification may change again within the same mtime tick:
# it is hashed again until it is older than this ("racy git").
_RACY_NS = 2_000_000_000
# folder → (stat signature of its files, time verified); shared by every Store in the process.
_verified: dict[str, tuple[tuple, int]] = {}
_verified_lock = threading.Lock()


def _signature(folder: Path, names) -> tuple:
    """``(name, size, mtime_ns, inode)`` per file: changes when a file is replaced or rewritten."""
    out = []
    for name in sorted(names):
        st = (folder / name).stat()
        out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative POSIX path (the manifest's names)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _write_manifest(folder: Path) -> None:
    """Record size and SHA-256 of every file in ``folder`` (read back right after writing, so
    from the page cache) in ``folder/manifest.json``."""
    names = [n for n in _files(folder) if n != MANIFEST]
    entries = {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in names}
    _write_json(folder / MANIFEST, {"format": 1, "files": entries})


def _damage(folder: Path) -> str | None:
    """Why the artifact in ``folder`` cannot be trusted, or ``None`` when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = manifest["files"]
        sizes = {n: int(e["bytes"]) for n, e in entries.items()}
    except FileNotFoundError:
        return "it has no manifest.json (an artifact of an older cfdebug, or an interrupted copy)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its manifest.json is unreadable ({type(exc).__name__})"
    if "meta.json" not in entries:
        return "its manifest.json lists no meta.json"
    try:
        signature = _signature(folder, entries)
    except OSError:
        missing = next(n for n in sorted(entries) if not (folder / n).is_file())
        return f"{missing} is missing"
    for name, size, _, _ in signature:
        if size != sizes[name]:
            return f"{name} has {size} bytes, but {sizes[name]} were written (truncated or replaced)"
    key = str(folder)
    now = time.time_ns()
    with _verified_lock:
        known = _verified.get(key)
    if known is not None and known[0] == signature and all(now - mtime > _RACY_NS for _, _, mtime, _ in signature):
        return None
    for name in sorted(entries):
        if _sha256(folder / name) != entries[name]["sha256"]:
            return f"{name} does not match its SHA-256 (the bytes changed after it was written)"
    with _verified_lock:
        _verified[key] = (signature, now)
    return None


def format_bytes(n: int) -> str:
    """``n`` bytes as text: ``512 B``, ``48.0 KiB``, ``1.50 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n} B"


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the disk that holds ``path``, or its nearest existing folder."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def no_space_error(path: str | Path, need: int | None = None, remedy: str = "write somewhere else") -> CfdebugError:
    """The message for a write to ``path`` that its full disk refused (``need`` bytes, when known)."""
    try:
        free = f"{format_bytes(free_bytes(path))} free"
    except OSError:
        free = "free space unknown"
    wanted = f"{format_bytes(need)} free" if need is not None else "room"
    return CfdebugError(
        f"Expected {wanted} on the disk holding {path}, but it is full (No space left on device; {free}). "
        f"Free some space, or {remedy}."
    )


def disk_error(path: str | Path, exc: OSError, need: int | None = None, remedy: str = "write somewhere else") -> CfdebugError | None:
    """A :class:`CfdebugError` for a write to ``path`` that the disk refused (full or read-only), or
    ``None`` when ``exc`` is another error."""
    if exc.errno in _FULL_ERRNOS:
        return no_space_error(path, need, remedy)
    if exc.errno == errno.EROFS:
        return CfdebugError(f"Expected to write {path}, but its file system is read-only. Remount it writable, or {remedy}.")
    return None


def _cache_error(action: str, path: Path, exc: OSError) -> CfdebugError:
    if exc.errno in _FULL_ERRNOS:
        return no_space_error(path, None, _WORKDIR_REMEDY)
    return CfdebugError(
        f"Expected to {action} {path}, but the system refused: {exc.strerror or exc}. "
        "Make the work directory writable (and remove any file standing where a cache folder goes), "
        "or pass another folder with `--workdir` / CFDEBUG_HOME."
    )


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _owner_tag() -> str:
    """``<pid>-<start time>-<host>`` of this process, for the names of its temporary folders."""
    stat = proc_stat(os.getpid())
    return f"{os.getpid()}-{stat.start if stat else 0}-{_host_tag()}"


def _abandoned(name: str, mtime: float, now: float) -> bool:
    """Whether the entry ``name`` of a cache kind folder is left over from a process that died:
    a discarded copy (``.bad-…``, removed right after its rename), or a temporary folder
    (``.tmp-<key>-<hex>-<pid>-<start>-<host>``) whose writer on this host no longer runs."""
    if name.startswith(".bad-"):
        return True
    if not name.startswith(".tmp-"):
        return False
    parts = name.rsplit("-", 3)
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit() or len(parts[1]) > 10:
        return now - mtime > _UNOWNED_TMP_AGE_S  # an older cfdebug's folder: its writer is unknown
    _, pid, start, host = parts
    if host != _host_tag():
        return False  # another machine's writer (a shared workdir): only it knows
    return not pid_alive(int(pid), None if start == "0" else start)


class Store:
    """The artifact cache under ``workdir``; opening it removes what dead writers left."""

    def __init__(self, workdir: str | Path):
        self.root = Path(workdir)
        try:
            (self.root / "objects").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CfdebugError(
                f"Cannot create the work directory {self.root}: {exc.strerror}. "
                "Pass a writable folder with `--workdir` or set CFDEBUG_HOME."
            ) from exc
        self.sweep()

    def sweep(self) -> list[Path]:
        """Remove the temporary folders of writers that died and the discarded copies a crash left
        under ``objects/<kind>/``; return what was removed. A live writer's folder is kept, and
        so is everything that cannot be removed (a read-only workdir)."""
        removed, now = [], time.time()
        try:
            kinds = [entry.path for entry in os.scandir(self.root / "objects") if entry.is_dir(follow_symlinks=False)]
        except OSError:
            return removed
        for kind in kinds:
            try:
                with os.scandir(kind) as scan:
                    entries = [(e.name, Path(e.path)) for e in scan if e.name.startswith((".tmp-", ".bad-"))]
            except OSError:
                continue
            for name, path in entries:
                try:
                    if not _abandoned(name, path.lstat().st_mtime, now):
                        continue
                except OSError:
                    continue  # already gone: another process swept it
                shutil.rmtree(path, ignore_errors=True)
                if not os.path.lexists(path):
                    removed.append(path)
        return removed

    def path(self, kind: str, key: str) -> Path:
        return self.root / "objects" / kind / key

    def exists(self, kind: str, key: str) -> bool:
        """Whether a complete, undamaged artifact is cached; a damaged one is discarded (with a
        warning saying why) and reported missing, so the caller recomputes it."""
        folder = self.path(kind, key)
        if not os.path.lexists(folder):
            return False
        if not folder.is_dir():
            raise CfdebugError(
                f"Expected the cache folder {folder}, but a file is there. Remove it, or pass another "
                "folder with `--workdir` / CFDEBUG_HOME."
            )
        problem = _damage(folder)
        if problem is None:
            return True
        self.discard(kind, key, problem)
        return False

    def discard(self, kind: str, key: str, reason: str) -> None:
        """Remove the artifact ``kind/key`` with a warning giving ``reason`` (a damaged cache entry)."""
        folder = self.path(kind, key)
        warnings.warn(f"discarding the cached {kind} artifact {folder}: {reason}; it is recomputed.", stacklevel=2)
        with _verified_lock:
            _verified.pop(str(folder), None)
        # Renamed first, so a concurrent reader never sees a half-deleted folder under the key.
        doomed = folder.parent / f".bad-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, doomed)
        except OSError:
            return  # another process discarded it first, or the folder is read-only (the writer says so)
        shutil.rmtree(doomed, ignore_errors=True)

    @contextmanager
    def writer(self, kind: str, key: str, meta: dict) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it becomes the artifact atomically.

        On an exception the temporary folder is removed and nothing is left behind.
        """
        final = self.path(kind, key)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}-{_owner_tag()}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            raise _cache_error("create the cache folder", tmp.parent, exc) from None
        try:
            yield tmp
            _write_json(tmp / "meta.json", meta)
            _write_manifest(tmp)  # last: a folder with a manifest is complete
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process finished the same artifact first; both are identical by key.
                if not self.exists(kind, key):
                    os.rename(tmp, final)  # the damaged copy in the way was discarded; retry once
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in _USER_ERRNOS:
                raise _cache_error("write the cache artifact", final, exc) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def save_arrays(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        with self.writer(kind, key, meta) as tmp:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.asarray(array))
        return self.path(kind, key)

    def load_arrays(self, kind: str, key: str, mmap: bool = False) -> tuple[dict[str, np.ndarray], dict]:
        """The ``.npy`` arrays of an artifact (by file stem) and its meta; only the files its
        manifest lists (:meth:`exists` verified those): anything else in the folder is ignored."""
        folder = self.path(kind, key)
        meta = self.load_meta(kind, key)
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        arrays = {
            Path(name).stem: np.load(folder / name, mmap_mode="r" if mmap else None, allow_pickle=False)
            for name in sorted(listed)
            if name.endswith(".npy") and "/" not in name
        }
        return arrays, meta

    def load_meta(self, kind: str, key: str) -> dict:
        with open(self.path(kind, key) / "meta.json") as handle:
            return json.load(handle)


# ---------------------------------------------------------------------------------- JSON
# The one JSON encoder: every JSON file or column cfdebug writes goes through :func:`json_text`.


def jsonable(value: Any, *, keep_nan: bool = False, what: str = "value") -> Any:
    """``value`` as plain JSON types, recursively: dict keys as text, tuples and arrays as lists,
    NumPy scalars, 0-d tensors and the like as Python numbers (``.tolist()``/``.item()``), paths as
    text; anything else raises :class:`CfdebugError` naming ``what``.

    A non-finite float (NaN, ±inf) becomes ``None`` unless ``keep_nan`` (see :func:`json_text`
    for where NaN is kept and why).
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v, keep_nan=keep_nan, what=what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, keep_nan=keep_nan, what=what) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float):  # NumPy's float64 too: a plain float comes back
        value = float(value)
        return value if keep_nan or math.isfinite(value) else None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if callable(getattr(value, "tolist", None)):  # NumPy arrays and scalars, tensors
        return jsonable(value.tolist(), keep_nan=keep_nan, what=what)
    if callable(getattr(value, "item", None)):
        return jsonable(value.item(), keep_nan=keep_nan, what=what)
    raise CfdebugError(
        f"Expected the {what} to hold only JSON values (numbers, strings, lists, dicts), but it holds a "
        f"{type(value).__name__} ({value!r:.80}). Convert it (e.g. float(x), str(path)) before passing it."
    )


def json_text(value: Any, *, keep_nan: bool = False, indent: int | None = None, sort_keys: bool = False, what: str = "value") -> str:
    """``value`` (converted by :func:`jsonable`) as JSON text: the one JSON encoder.

    The NaN policy, decided once: by default a non-finite float is written as ``null``, so what
    a user or another tool opens is valid JSON (RFC 8259 has no NaN): ``--json`` outputs, the
    run files ``run.json``, ``result.json`` and ``progress.jsonl``. ``keep_nan=True`` writes the
    bare literals ``NaN``/``Infinity``/``-Infinity`` (Python's ``json`` reads them back as
    floats); it is used only where cfdebug itself reads the value back and must get it unchanged:
    the run registry's columns in ``runs.db`` (a diverged loss's NaN stays readable in a run's
    progress and result) and the cache's ``meta.json`` (a cache hit must give back what was
    stored, e.g. a selector history's NaN test accuracy when there is no test split).
    """
    plain = jsonable(value, keep_nan=keep_nan, what=what)
    return json.dumps(plain, allow_nan=keep_nan, indent=indent, sort_keys=sort_keys)


def _write_json(path: Path, payload: dict) -> None:
    """A cache artifact's ``meta.json``/``manifest.json`` (read back by cfdebug only: NaN kept)."""
    path.write_text(json_text(payload, keep_nan=True, indent=1, sort_keys=True, what=f"content of {path.name}"))


@contextmanager
def atomic_file(path: str | Path, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` atomically.

    The one atomic writer for single files (run configs, results, checkpoints, ``--json`` and
    ``--csv`` outputs): the file is synced, then renamed over ``path`` with ``os.replace``, so a
    reader sees the old file or the new one, never half of one. On an exception the temporary
    file is removed and ``path`` is untouched. Missing parent folders are created. A full or
    read-only disk raises :class:`CfdebugError` naming ``path`` (and ``size``, the bytes to be
    written, when the caller knows it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        error = disk_error(path, exc, size, "pass a path on another disk")
        if error is None:
            raise
        raise error from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`)."""
    data = text.encode()
    with atomic_file(path, len(data)) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (user-named outputs): valid JSON, a
    non-finite float written as ``null`` (:func:`json_text`)."""
    write_text_atomic(path, json_text(payload, indent=2, what="output"))


def torch_save_atomic(payload, path: str | Path) -> None:
    """``torch.save(payload)`` to ``path`` atomically (checkpoints, ``model.pt``)."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
