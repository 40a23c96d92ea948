"""``python -m cfdebug serve``: start the dashboard, on 127.0.0.1 unless sharing is asked for.

A thin wrapper over ``streamlit run app.py``: Streamlit reads ``.streamlit/config.toml`` beside
``app.py`` from any working directory; this adds the bind address and port, keeps XSRF
protection on, and passes the allowed roots and read-only mode to the dashboard through the
environment (:mod:`cfdebug.access` reads them there).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from .access import READ_ONLY_ENV, ROOTS_ENV, read_only as env_read_only
from .errors import CfdebugError

APP = Path(__file__).resolve().parents[1] / "app.py"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
# Options serve owns: the address and port come from --host/--port, XSRF protection stays on.
RESERVED_OPTIONS = ("--server.address", "--server.port", "--server.enableXsrfProtection", "--server.enableCORS")
SHARING_WARNING = (
    "the dashboard listens on {host}:{port} without authentication: anyone who can reach this port can start "
    "training; put it behind a reverse proxy with authentication, or add --read-only"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _check_extra(extra) -> list[str]:
    extra = list(extra or ())
    for arg in extra:
        if arg.split("=", 1)[0] in RESERVED_OPTIONS:
            raise CfdebugError(
                f"Expected no {arg.split('=', 1)[0]} among the Streamlit options, but got {arg!r}; "
                "use --host and --port (XSRF and CORS protection stay on)."
            )
    return extra


def serve_argv(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, roots=(), read_only: bool = False,
               extra=()) -> tuple[list[str], dict[str, str]]:
    """The command that starts the dashboard and the environment it runs in.

    ``roots`` (existing folders) are added to ``$CFDEBUG_ROOTS`` as real paths; read-only mode is
    on when asked for or already set in ``$CFDEBUG_READ_ONLY``. ``extra`` are further Streamlit
    options (``--theme.base dark``), not the reserved ones (:data:`RESERVED_OPTIONS`).
    Returns ``(argv, env)`` with ``env`` the full environment for the child.
    """
    if not APP.is_file():
        raise CfdebugError(f"Expected the dashboard script at {APP}, but it is not there; run `serve` from a source checkout (pip install -e .).")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise CfdebugError(f"Expected --port to be an integer in 1…65535, but got {port!r}.")
    added = []
    for root in roots:
        real = os.path.realpath(os.path.expanduser(root))
        if not os.path.isdir(real):
            raise CfdebugError(f"Expected --root {root} to be an existing folder, but it is not; pass a folder the dashboard may read.")
        added.append(real)
    env = dict(os.environ)
    env[ROOTS_ENV] = os.pathsep.join([r for r in env.get(ROOTS_ENV, "").split(os.pathsep) if r] + added)
    env[READ_ONLY_ENV] = "1" if read_only or env_read_only() else "0"
    argv = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host, "--server.port", str(port), "--server.enableXsrfProtection", "true",
        "--server.headless", "true", "--browser.gatherUsageStats", "false", *_check_extra(extra),
    ]
    return argv, env


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, roots=(), read_only: bool = False, extra=()) -> None:
    """Replace this process with the dashboard (:func:`serve_argv`); warns on stderr when it is
    reachable from other machines and not read-only."""
    argv, env = serve_argv(host, port, roots, read_only, extra)
    if not is_loopback(host) and env[READ_ONLY_ENV] != "1":
        print(f"warning: {SHARING_WARNING.format(host=host, port=port)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
