"""``python -m cfdebug serve``: start the dashboard, on 127.0.0.1 unless sharing is asked for.

A thin wrapper over ``streamlit run app.py``: Streamlit reads ``.streamlit/config.toml`` beside
``app.py`` from any working directory; this adds the bind address and port, keeps XSRF and
CORS protection on (refusing every Streamlit option that would let more clients or origins in),
and passes the allowed roots, read-only mode and that it is shared (every path confined to the
roots, typed ones too) to the dashboard through the environment (:mod:`cfdebug.access` reads
them there).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .access import READ_ONLY_ENV, ROOTS_ENV, SHARED_ENV, is_loopback, read_only as env_read_only
from .errors import CfdebugError

APP = Path(__file__).resolve().parents[1] / "app.py"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
# Options that decide who may connect, refused among the Streamlit options (and as STREAMLIT_*
# environment variables): the address and port come from --host/--port; XSRF and CORS protection
# stay on (enableCORS=false, or a corsAllowedOrigins entry, lets another site's pages talk to the
# server; browser.serverAddress is added to the origins the websocket accepts; development mode
# allows every origin); no agent API, no identity taken from request headers, no static files.
RESERVED_OPTIONS = (
    "--server.address", "--server.port",
    "--server.enableXsrfProtection", "--server.xsrfCookieSameSite",
    "--server.enableCORS", "--server.corsAllowedOrigins", "--browser.serverAddress", "--global.developmentMode",
    "--server.enableAgentApi", "--server.trustedUserHeaders", "--server.enableStaticServing",
)
# The reserved options serve_argv always passes (the command line wins over the environment and
# config.toml files): the address and port, XSRF and CORS protection on.
_GIVEN_OPTIONS = ("--server.address", "--server.port", "--server.enableXsrfProtection", "--server.enableCORS")
SHARING_WARNING = (
    "the dashboard listens on {host}:{port} without authentication: anyone who can reach this port can start "
    "training; put it behind a reverse proxy with authentication, or add --read-only"
)


def _env_var(option: str) -> str:
    """The environment variable Streamlit reads ``option`` from (``--server.enableCORS`` → ``STREAMLIT_SERVER_ENABLE_CORS``)."""
    name = option.lstrip("-").replace(".", "_")
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return "STREAMLIT_" + re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).upper()


def _refused(what: str, given: str) -> CfdebugError:
    return CfdebugError(
        f"Expected no {what} among the Streamlit options (nor its STREAMLIT_* variable), but got {given!r}: "
        "it decides who may connect. "
        "Use --host and --port (XSRF and CORS protection stay on); to share the dashboard further, put it "
        "behind a reverse proxy with authentication."
    )


def _check_extra(extra, env) -> list[str]:
    """``extra`` unless it, or ``env``, sets an option of :data:`RESERVED_OPTIONS` (either spelling:
    ``--opt=value`` or ``--opt value``; the name compared without regard to case)."""
    extra = list(extra or ())
    reserved = {option.lower(): option for option in RESERVED_OPTIONS}
    for arg in extra:
        if arg.split("=", 1)[0].lower() in reserved:
            raise _refused(reserved[arg.split("=", 1)[0].lower()], arg)
    for option in RESERVED_OPTIONS:
        if option not in _GIVEN_OPTIONS and env.get(_env_var(option)):  # a given option wins over its variable
            raise _refused(option, f"{_env_var(option)}={env[_env_var(option)]}")
    return extra


def serve_argv(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, roots=(), read_only: bool = False,
               extra=()) -> tuple[list[str], dict[str, str]]:
    """The command that starts the dashboard and the environment it runs in.

    ``roots`` (existing folders) are added to ``$CFDEBUG_ROOTS`` as real paths; read-only mode is
    on when asked for or already set in ``$CFDEBUG_READ_ONLY``. ``extra`` are further Streamlit
    options (``--theme.base dark``), not the reserved ones (:data:`RESERVED_OPTIONS`), which the
    environment may not set either.
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
    env[SHARED_ENV] = "1"  # serve is how a dashboard is shared: typed paths stay inside the roots too (cfdebug.access)
    argv = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host, "--server.port", str(port), "--server.enableXsrfProtection", "true", "--server.enableCORS", "true",
        "--server.headless", "true", "--browser.gatherUsageStats", "false", *_check_extra(extra, env),
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
