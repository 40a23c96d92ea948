"""What a dashboard visitor may make the server read: allowed roots and read-only mode.

Every path that comes from a widget or the URL (weights file, dataset folder) is resolved
(symlinks followed) and must lie inside an allowed root; outside, the answer is one fixed
message that says nothing about whether the path exists or what it holds. Every image file the
dashboard shows is resolved the same way (:func:`image_allowed`): a symlink inside an allowed
dataset may point anywhere.

Read-only mode (``serve --read-only``) opens the preset workspaces alone (:func:`is_preset`:
every field of the workspace) and starts no run; its pages show what is cached. The dashboard checks
BEFORE it calls the library, whose own messages (e.g. a folder's listing) are meant for a local
CLI user reading their own files. The CLI does not use this module.

Imports neither streamlit nor torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import DEMO_DATASETS, DataConfig, WorkspaceConfig, default_workdir
from .errors import CfdebugError, check_path_length

ROOTS_ENV = "CFDEBUG_ROOTS"
READ_ONLY_ENV = "CFDEBUG_READ_ONLY"
# Captured once: relative paths from a visitor resolve against the folder the dashboard was
# started from, which is also the first allowed root.
START_DIR = Path(os.path.realpath(os.getcwd()))
_FALSE = ("", "0", "false", "no", "off")


def _real(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded (as the data loader does), made absolute against the start
    directory and resolved through every symlink."""
    path = Path(os.path.expanduser(os.fspath(path)))
    return Path(os.path.realpath(path if path.is_absolute() else START_DIR / path))


def allowed_roots(extra=None) -> list[Path]:
    """The folders the dashboard may read, real paths, without duplicates: the start directory,
    the workdir (``$CFDEBUG_HOME`` or ``./.cfdebug``), every entry of ``$CFDEBUG_ROOTS``
    (split on ``os.pathsep``), then ``extra``. Read on every call, so tests can set the env."""
    entries = [START_DIR, default_workdir(), *os.environ.get(ROOTS_ENV, "").split(os.pathsep), *(extra or ())]
    roots: list[Path] = []
    for entry in entries:
        if entry and (root := _real(entry)) not in roots:
            roots.append(root)
    return roots


def _display(root: Path) -> str:
    """How a root is named in messages: relative to the start directory when inside it."""
    if root == START_DIR:
        return "its start folder"
    if root.is_relative_to(START_DIR):
        return f"`{root.relative_to(START_DIR)}`"
    return f"`{root}`"


def outside_roots_message(roots: list[Path], what: str) -> str:
    """The one message for any ``what`` outside ``roots``; it names no path a visitor typed."""
    return (
        f"Expected the {what} to be inside a folder this dashboard may read ({', '.join(map(_display, roots))}), "
        "but it is not; give a path inside one of these, or ask whoever started the dashboard to add its folder "
        f"with `--root` (`python -m cfdebug serve --root DIR`, or `{ROOTS_ENV}`)."
    )


def resolve_allowed(path: str | os.PathLike, roots: list[Path] | None = None, what: str = "dataset folder") -> Path:
    """The real path of ``path`` when it lies inside one of ``roots`` (default :func:`allowed_roots`).

    Raises :class:`CfdebugError` with :func:`outside_roots_message` otherwise, the same text
    whether the path exists or not, is a file or a folder; a path too long for the system gets
    its own message (lengths only). Relative paths resolve against the start directory.
    """
    roots = allowed_roots() if roots is None else roots
    try:
        check_path_length(path, f"the {what}")  # a 20,000-character URL parameter: say so, not "outside"
        real = _real(path)
    except (TypeError, ValueError, OSError):  # a NUL byte, a non-string, a name too long: outside too
        real = None
    if real is None or not any(real.is_relative_to(root) for root in roots):
        raise CfdebugError(outside_roots_message(roots, what))
    return real


def read_only() -> bool:
    """Whether the dashboard runs read-only (``$CFDEBUG_READ_ONLY``, set by ``serve --read-only``).

    Any value but empty, 0, false, no or off counts as read-only: an unclear setting fails closed.
    """
    return os.environ.get(READ_ONLY_ENV, "").strip().lower() not in _FALSE


def image_allowed(path: str | os.PathLike, roots: list[Path] | None = None) -> bool:
    """Whether an image file the dashboard would show resolves inside ``roots`` (default
    :func:`allowed_roots`); the folder it was listed from being allowed is not enough."""
    try:
        resolve_allowed(path, roots, "image")
        return True
    except CfdebugError:
        return False


def preset_workspaces(workdir: str, device: str = "auto") -> list[WorkspaceConfig]:
    """The workspaces a read-only dashboard opens: the shipped demo CNN on each embedded dataset,
    every other field at its default (no weights file, the default layer, input size, mean, std,
    training and extraction settings)."""
    return [WorkspaceConfig(data=DataConfig(source=name), device=device, workdir=workdir) for name in DEMO_DATASETS]


def is_preset(cfg: WorkspaceConfig) -> bool:
    """Whether ``cfg`` equals one of :func:`preset_workspaces` in every field but ``device`` (the
    same cached model on another device; no file named) and ``workdir`` (the server's own)."""
    return cfg in preset_workspaces(cfg.workdir, cfg.device)


READ_ONLY_WORKSPACE_MESSAGE = (
    "Expected one of the preset workspaces (demo-cnn on " + ", ".join(DEMO_DATASETS) + " with the default settings: no "
    "weights file, and Input size, Mean, Std and Target layer left blank), but got another model, weights file, dataset "
    "or setting; this dashboard is read-only (started with `--read-only`). Run it yourself with `make demo` to open your "
    "own model or data."
)


def check_workspace(cfg: WorkspaceConfig, roots: list[Path] | None = None) -> None:
    """Raise :class:`CfdebugError` unless a dashboard visitor may open ``cfg``.

    Read-only: only presets (:func:`is_preset`). Otherwise the weights file and a dataset that
    is not an embedded one must pass :func:`resolve_allowed`; model names are builder names,
    not paths, and are not checked here.
    """
    if read_only() and not is_preset(cfg):
        raise CfdebugError(READ_ONLY_WORKSPACE_MESSAGE)
    roots = allowed_roots() if roots is None else roots
    if cfg.model.weights:
        resolve_allowed(cfg.model.weights, roots, "weights file")
    if cfg.data.source not in DEMO_DATASETS:
        resolve_allowed(cfg.data.source, roots, "dataset folder")
