"""What a dashboard visitor may make the server read: allowed roots, who is at the keyboard,
read-only mode.

Two kinds of dashboard (:func:`shared`):

* **Personal** (``make demo``, ``streamlit run app.py`` on a loopback address, not started by
  ``serve``, not read-only): the person typing in the sidebar owns the machine, so a weights
  file or dataset folder typed there opens wherever it is (:func:`check_workspace` with
  ``typed=True``), and is remembered in the workdir (:func:`remember_owner_folder`) so that a
  reload or a link of this dashboard reopens it. A path that comes from the URL alone must lie
  inside an allowed root or a folder the owner opened before.
* **Shared** (``serve``, whatever its host; any non-loopback address; read-only): every path,
  typed or from the URL, is resolved (symlinks followed) and must lie inside an allowed root;
  outside, the answer is one fixed message that says nothing about whether the path exists or
  what it holds, and names the command that adds a root. Folders the owner opened are ignored.

Every image file the dashboard shows is resolved the same way (:func:`image_allowed`): a
symlink inside an allowed dataset may point anywhere.

Read-only mode (``serve --read-only``) opens the preset workspaces alone (:func:`is_preset`:
every field of the workspace) and starts no run; its pages show what is cached. The dashboard checks
BEFORE it calls the library, whose own messages (e.g. a folder's listing) are meant for a local
CLI user reading their own files. The CLI does not use this module.

Imports neither streamlit nor torch.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
from pathlib import Path

from .config import DEMO_DATASETS, DataConfig, WorkspaceConfig, default_workdir
from .errors import CfdebugError, check_path_length

ROOTS_ENV = "CFDEBUG_ROOTS"
READ_ONLY_ENV = "CFDEBUG_READ_ONLY"
#: Set by ``serve`` (any host): the dashboard is shared, so typed paths are confined too.
SHARED_ENV = "CFDEBUG_SHARED"
#: In the workdir: the folders (and weights files) the owner of a personal dashboard opened from the sidebar.
OWNER_FOLDERS_FILE = "dashboard-opened.json"
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
    """How a root is named in messages: the start folder and the workdir by role and path."""
    if root == START_DIR:
        return f"the start folder `{root}`"
    if root == _real(default_workdir()):
        return f"the workdir `{root}`"
    return f"`{root}`"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except (TypeError, ValueError):
        return False  # none (every interface) or a host name: it may resolve to any interface


def shared(address: str | None) -> bool:
    """Whether people other than the machine's owner may reach the dashboard: started by ``serve``
    (:data:`SHARED_ENV`, whatever its host: a reverse proxy on 127.0.0.1 shares it too), read-only,
    or listening on ``address`` that is not a loopback one (Streamlit's ``server.address``; none
    means every interface). Only a personal dashboard opens typed paths outside the roots."""
    flag = os.environ.get(SHARED_ENV, "").strip().lower() not in _FALSE
    return flag or read_only() or not is_loopback(address)


def _folder_command(path) -> str:
    """``make demo ROOTS=<the folder>`` for a typed ``path`` (its folder when it is a file), or with
    ``DIR`` when there is none to name."""
    try:
        real = _real(path)
    except (TypeError, ValueError, OSError):
        real = None
    if real is None:
        return "make demo ROOTS=DIR"
    folder = real if real.is_dir() or not real.suffix else real.parent
    return f"make demo ROOTS={shlex.quote(str(folder)).replace('`', '')}"


def outside_roots_message(roots: list[Path], what: str, *, is_shared: bool = True, path: str | None = None) -> str:
    """The one message for any ``what`` outside ``roots``, ending in the one command that opens it.

    Shared (:func:`shared`): it names no path a visitor typed, and the command the owner runs to
    add a root. Personal (a path that came from the URL): typing it in the sidebar opens it, and
    the command names its folder.
    """
    where = ", ".join(map(_display, roots))
    if is_shared:
        return (f"Expected the {what} to be inside a folder this shared dashboard may read ({where}), but it is outside them; ask whoever "
                "started the dashboard to restart it with the folder added: `make serve ROOTS=DIR` (or `python -m cfdebug serve --root DIR`).")
    return (f"Expected the link's {what} to be inside a folder a link may open ({where}, or one opened from the sidebar), but it is outside "
            f"them; type it in the sidebar to open it, or restart with `{_folder_command(path)}`.")


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


def owner_folders(workdir: str | os.PathLike) -> list[Path]:
    """The paths the owner of a personal dashboard opened from the sidebar (:func:`remember_owner_folder`)."""
    try:
        entries = json.loads((Path(workdir) / OWNER_FOLDERS_FILE).read_text()).get("paths", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [Path(p) for p in entries if isinstance(p, str)]


def remember_owner_folder(workdir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Keep ``path`` (its real path) among :func:`owner_folders`, so links of a personal dashboard reopen it."""
    from .store import write_json_atomic

    real = _real(path)
    known = owner_folders(workdir)
    if real in known:
        return
    Path(workdir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(workdir) / OWNER_FOLDERS_FILE, {"paths": [str(p) for p in [*known, real][-50:]]})


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


def workspace_paths(cfg: WorkspaceConfig) -> list[tuple[str, str]]:
    """The paths ``cfg`` names, as ``(path, what)``: its weights file and its dataset folder (not
    the embedded datasets' names; model names are builder names, not paths)."""
    out = [(cfg.model.weights, "weights file")] if cfg.model.weights else []
    return out + ([(cfg.data.source, "dataset folder")] if cfg.data.source not in DEMO_DATASETS else [])


def check_workspace(cfg: WorkspaceConfig, roots: list[Path] | None = None, *, address: str | None = None,
                    typed: bool = False) -> None:
    """Raise :class:`CfdebugError` unless a dashboard visitor may open ``cfg``.

    Read-only: only presets (:func:`is_preset`). A personal dashboard (``not shared(address)``)
    opens a ``typed`` workspace (from the sidebar) wherever its paths are, and one from the URL
    when its paths lie inside ``roots`` (default :func:`allowed_roots`) or a folder the owner
    opened (:func:`owner_folders`). A shared one: every path inside ``roots``
    (:func:`resolve_allowed`).
    """
    if read_only() and not is_preset(cfg):
        raise CfdebugError(READ_ONLY_WORKSPACE_MESSAGE)
    is_shared = shared(address)
    for path, what in workspace_paths(cfg):
        if typed and not is_shared:
            check_path_length(path, f"the {what}")
            continue
        allowed = allowed_roots() if roots is None else roots
        if is_shared:
            resolve_allowed(path, allowed, what)
            continue
        check_path_length(path, f"the {what}")  # its own message, as resolve_allowed gives it
        try:
            resolve_allowed(path, allowed + owner_folders(cfg.workdir), what)
        except CfdebugError:
            raise CfdebugError(outside_roots_message(allowed, what, is_shared=False, path=path)) from None
