"""Safe to share: allowed roots, read-only mode, the 127.0.0.1 default and `serve`."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cfdebug import access
from cfdebug.access import allowed_roots, check_workspace, outside_roots_message, read_only, resolve_allowed
from cfdebug.cli import main
from cfdebug.config import DataConfig, ModelConfig, WorkspaceConfig
from cfdebug.errors import CfdebugError
from cfdebug.serve import SHARING_WARNING, is_loopback, serve_argv

ROOT = Path(__file__).resolve().parents[1]
OVERVIEW = str(ROOT / "views" / "overview.py")


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    """No roots, read-only or shared mode leaking in from the environment running the tests."""
    monkeypatch.delenv("CFDEBUG_ROOTS", raising=False)
    monkeypatch.delenv("CFDEBUG_READ_ONLY", raising=False)
    monkeypatch.delenv("CFDEBUG_SHARED", raising=False)


# ---- cfdebug.access


def test_allowed_roots_are_start_dir_workdir_and_env(tmp_path, monkeypatch):
    extra_a, extra_b = tmp_path / "a", tmp_path / "b"
    extra_a.mkdir()
    (tmp_path / "link").symlink_to(extra_a)
    monkeypatch.setenv("CFDEBUG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CFDEBUG_ROOTS", os.pathsep.join([str(tmp_path / "link"), str(extra_b), ""]))
    roots = allowed_roots(extra=[str(extra_a)])
    assert roots == [access.START_DIR, tmp_path.resolve() / "home", extra_a.resolve(), extra_b.resolve()]  # real paths, no duplicates


def test_outside_roots_is_one_message_whatever_exists(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    (outside / "secret").mkdir(parents=True)
    (outside / "weights.pt").write_bytes(b"x")
    (root / "escape").symlink_to(outside)  # inside by name, outside once resolved
    roots = [root.resolve()]
    expected = outside_roots_message(roots, "weights file")
    for path in [outside / "weights.pt", outside / "missing.pt", outside, outside / "secret", root / "escape",
                 root / "escape" / "weights.pt", root / "data" / ".." / ".." / "outside", "/etc", "/etc/hostname",
                 "/etc/no_such_file", "bad\0name", ""]:
        with pytest.raises(CfdebugError) as err:
            resolve_allowed(path, roots, "weights file")
        assert str(err.value) == expected, path
    assert "secret" not in expected and "weights.pt" not in expected and str(outside) not in expected
    assert resolve_allowed(root / "data", roots) == (root / "data").resolve()
    assert resolve_allowed(root / "not-yet", roots) == (root / "not-yet").resolve()  # inside: the library says it is missing


def test_relative_paths_resolve_against_the_start_dir():
    assert resolve_allowed("views") == access.START_DIR / "views"
    with pytest.raises(CfdebugError):
        resolve_allowed("../" * 40 + "etc")


def test_read_only_from_env_fails_closed(monkeypatch):
    assert not read_only()
    for value, expected in [("1", True), ("true", True), ("yes", True), ("maybe", True), ("0", False), ("off", False), ("", False)]:
        monkeypatch.setenv("CFDEBUG_READ_ONLY", value)
        assert read_only() is expected, value


def test_check_workspace_skips_demo_names_and_checks_paths(monkeypatch, tmp_path):
    check_workspace(WorkspaceConfig(data=DataConfig(source="hard-digits")), roots=[tmp_path])  # a name, not a path
    check_workspace(WorkspaceConfig(model=ModelConfig(name="resnet18")), roots=[tmp_path])  # a builder name
    with pytest.raises(CfdebugError, match="dataset folder to be inside"):
        check_workspace(WorkspaceConfig(data=DataConfig(source="/etc")), roots=[tmp_path])
    with pytest.raises(CfdebugError, match="weights file to be inside"):
        check_workspace(WorkspaceConfig(model=ModelConfig(weights="/etc/hostname")), roots=[tmp_path])
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    check_workspace(WorkspaceConfig(data=DataConfig(source="clean-digits")))
    inside = str(tmp_path / "w.pt")
    for cfg in [WorkspaceConfig(model=ModelConfig(name="resnet18")), WorkspaceConfig(model=ModelConfig(weights=inside)),
                WorkspaceConfig(model=ModelConfig(layer="features.0")), WorkspaceConfig(data=DataConfig(source=str(tmp_path)))]:
        with pytest.raises(CfdebugError) as err:
            check_workspace(cfg, roots=[tmp_path])
        assert str(err.value) == access.READ_ONLY_WORKSPACE_MESSAGE


# ---- the dashboard


@pytest.fixture
def overview(demo_workspace, workdir, monkeypatch):
    monkeypatch.setenv("CFDEBUG_HOME", str(workdir))

    def _open(**query) -> AppTest:
        at = AppTest.from_file(OVERVIEW, default_timeout=180)
        for key, value in query.items():
            at.query_params[key] = value
        return at.run()

    return _open


def _errors(at: AppTest) -> list[str]:
    assert not at.exception, [e.value for e in at.exception]
    return [e.value for e in at.error]


def _query(at: AppTest, key: str):
    value = at.query_params.get(key)
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _shows_default_workspace(at: AppTest) -> None:
    assert [m.label for m in at.metric][:3] == ["Train accuracy", "Val accuracy", "Test accuracy"]
    assert _query(at, "data") == "biased-digits" and not at.query_params.get("weights")


def test_url_dataset_outside_roots_shows_no_listing(overview, monkeypatch):
    """A shared dashboard: one message for a link's folder outside the roots, whatever it names."""
    monkeypatch.setenv("CFDEBUG_SHARED", "1")
    at = overview(data="/etc")
    assert _errors(at) == [outside_roots_message(allowed_roots(), "dataset folder")]
    assert overview(data="/no/such/folder").error[0].value == at.error[0].value  # nothing tells them apart
    page_text = " ".join(e.value for e in [*at.error, *at.markdown, *at.caption, *at.info])
    assert "passwd" not in page_text and "hostname" not in page_text  # no listing of /etc
    assert "`make serve ROOTS=DIR`" in at.error[0].value
    _shows_default_workspace(at)  # fell back to the demo; the bad parameter is gone


def test_personal_dashboard_link_outside_roots_says_what_to_run(overview, tmp_path):
    """On a personal dashboard (loopback, not `serve`) a link still opens only the roots; the message,
    at the top of the page, names the command that adds the folder and the sidebar that opens it."""
    folder = tmp_path / "digits"
    folder.mkdir()
    at = overview(data=str(folder))
    [message] = _errors(at)
    assert message.startswith("Expected the link's dataset folder to be inside") and "type it in the sidebar" in message
    assert message.endswith(f"restart with `make demo ROOTS={folder.resolve()}`.")
    assert [e.value for e in at.main.error] == [message] and not at.sidebar.error  # at the top of the page, not the sidebar's foot
    page_text = " ".join(e.value for e in [*at.markdown, *at.caption, *at.info])
    assert "passwd" not in page_text
    _shows_default_workspace(at)


def test_url_weights_outside_roots_same_message_existing_or_missing(overview, tmp_path, monkeypatch):
    monkeypatch.setenv("CFDEBUG_SHARED", "1")
    existing = tmp_path / "model.pt"
    existing.write_bytes(b"not a checkpoint")
    messages = []
    for path in (existing, tmp_path / "no_such_file.pt", "/etc/hostname", "/etc/no_such_file"):
        at = overview(weights=str(path))
        messages.append(_errors(at))
        _shows_default_workspace(at)
    assert messages == [[outside_roots_message(allowed_roots(), "weights file")]] * 4


def _type_folder(at: AppTest, folder) -> AppTest:
    at.sidebar.selectbox[0].set_value("a folder…")
    at.sidebar.text_input[2].set_value(str(folder))
    return at.sidebar.button[0].click().run()


def test_load_button_outside_roots_keeps_the_workspace_when_shared(overview, tmp_path, monkeypatch):
    monkeypatch.setenv("CFDEBUG_SHARED", "1")
    (tmp_path / "train").mkdir()
    at = overview(data="clean-digits")
    assert not _errors(at)
    _type_folder(at, tmp_path)
    assert _errors(at) == [outside_roots_message(allowed_roots(), "dataset folder")]
    assert [e.value for e in at.main.error] == _errors(at) and not at.sidebar.error  # at the top of the page
    assert _query(at, "data") == "clean-digits"


def test_personal_dashboard_opens_a_typed_folder_and_remembers_it(overview, tmp_path, workdir):
    """The person at the keyboard owns the machine: a folder typed in the sidebar opens wherever it
    is (here the loader's own message about its layout shows: it was read), and the workdir keeps
    it, so a link of this dashboard reopens it; a shared dashboard ignores what the owner opened."""
    folder = tmp_path / "mine"
    (folder / "train").mkdir(parents=True)
    at = overview(data="clean-digits")
    _type_folder(at, folder)
    [message] = _errors(at)
    assert "does not exist" in message and "/test" in message  # the dataset loader ran on it: not refused
    assert folder.resolve() in access.owner_folders(workdir)
    again = overview(data=str(folder))  # a reload or a link: opened from the remembered folders
    assert not any("to be inside" in e for e in _errors(again))
    cfg = WorkspaceConfig(data=DataConfig(source=str(folder)), workdir=str(workdir))
    check_workspace(cfg, address="127.0.0.1")  # a link, on a personal dashboard
    with pytest.raises(CfdebugError, match="shared dashboard"):
        check_workspace(cfg, address="0.0.0.0", typed=True)  # every interface: confined, typed or not
    check_workspace(WorkspaceConfig(data=DataConfig(source="/no/such/place")), address="::1", typed=True)  # typed: any path


def test_read_only_opens_presets_only(overview, monkeypatch):
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    at = overview(model="resnet18", data="hard-digits")
    assert _errors(at) == [access.READ_ONLY_WORKSPACE_MESSAGE]
    _shows_default_workspace(at)


def _notice_page():
    from cfdebug.ui.access import read_only_notice

    if not read_only_notice():
        import streamlit as st

        st.button("Launch run")


def test_read_only_notice_replaces_the_launch_button(monkeypatch):
    at = AppTest.from_function(_notice_page).run()
    assert [b.label for b in at.button] == ["Launch run"] and not at.info
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    at = AppTest.from_function(_notice_page).run()
    assert not at.button
    assert [i.value for i in at.info] == [
        "This dashboard is read-only (started with `--read-only`): launching and cancelling runs is off. "
        "Run it yourself with `make demo` to train."
    ]


@pytest.mark.parametrize("page, launch", [("treatment.py", "Launch run"), ("calibration.py", "Train selector and run the report")])
def test_read_only_pages_say_so_instead_of_launching(demo_workspace, workdir, monkeypatch, page, launch):
    monkeypatch.setenv("CFDEBUG_HOME", str(workdir))
    at = AppTest.from_file(str(ROOT / "views" / page), default_timeout=180).run()
    assert not at.exception, [e.value for e in at.exception]
    assert launch in [b.label for b in at.button]
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    at = AppTest.from_file(str(ROOT / "views" / page), default_timeout=180).run()
    assert not at.exception, [e.value for e in at.exception]
    labels = [b.label for b in at.button]
    assert launch not in labels and "Cancel run" not in labels
    assert any("read-only" in i.value for i in at.info)


# ---- binding and `serve`


def test_default_config_binds_to_loopback_with_xsrf_on():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["server"]["enableXsrfProtection"] is True
    demo = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "streamlit run app.py" in line)
    assert "--server.address 127.0.0.1" in demo


def test_make_demo_passes_roots_to_the_dashboard(tmp_path):
    """`make demo ROOTS="A B"`: the dashboard reads them from CFDEBUG_ROOTS (what a refusal tells you to run)."""
    out = subprocess.run(["make", "-n", "demo", f"ROOTS={tmp_path / 'a'} {tmp_path / 'b'}", "STAMP=Makefile"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "streamlit run app.py" in line)
    assert line.startswith(f'CFDEBUG_ROOTS="{tmp_path / "a"}:{tmp_path / "b"}" ')
    plain = subprocess.run(["make", "-n", "demo", "STAMP=Makefile"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "CFDEBUG_ROOTS" not in plain


def test_shared_when_served_read_only_or_not_on_loopback(monkeypatch):
    assert not access.shared("127.0.0.1") and not access.shared("localhost")
    assert access.shared(None) and access.shared("0.0.0.0") and access.shared("example.org")
    monkeypatch.setenv("CFDEBUG_SHARED", "1")
    assert access.shared("127.0.0.1")
    monkeypatch.setenv("CFDEBUG_SHARED", "0")
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    assert access.shared("127.0.0.1")


def test_serve_argv_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CFDEBUG_ROOTS", "/srv/already")
    argv, env = serve_argv()
    assert argv[:5] == [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py")]
    options = dict(zip(argv[5::2], argv[6::2]))
    assert options["--server.address"] == "127.0.0.1" and options["--server.port"] == "8501"
    assert options["--server.enableXsrfProtection"] == "true" and options["--server.headless"] == "true"
    assert env["CFDEBUG_READ_ONLY"] == "0" and env["CFDEBUG_ROOTS"] == "/srv/already"
    assert env["CFDEBUG_SHARED"] == "1"  # `serve` shares: typed paths are confined to the roots too (cfdebug.access.shared)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    argv, env = serve_argv("0.0.0.0", 8600, [str(tmp_path / "link")], True, ["--theme.base", "dark"])
    assert argv[5:9] == ["--server.address", "0.0.0.0", "--server.port", "8600"] and argv[-2:] == ["--theme.base", "dark"]
    assert env["CFDEBUG_READ_ONLY"] == "1"
    assert env["CFDEBUG_ROOTS"].split(os.pathsep) == ["/srv/already", str((tmp_path / "real").resolve())]
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    assert serve_argv()[1]["CFDEBUG_READ_ONLY"] == "1"  # read-only set by the environment stays on


def test_serve_refuses_missing_roots_and_reserved_options(tmp_path):
    with pytest.raises(CfdebugError, match="--root"):
        serve_argv(roots=[str(tmp_path / "missing")])
    for extra in (["--server.address", "0.0.0.0"], ["--server.enableXsrfProtection=false"], ["--server.port", "1"]):
        with pytest.raises(CfdebugError, match="--host and --port"):
            serve_argv(extra=extra)


WIDENING = [  # (option, a value that would let more clients or origins in)
    ("--server.corsAllowedOrigins", "http://evil.example"),
    ("--server.enableCORS", "false"),
    ("--browser.serverAddress", "evil.example"),
    ("--global.developmentMode", "true"),
    ("--server.xsrfCookieSameSite", "none"),
    ("--server.enableAgentApi", "true"),
    ("--server.trustedUserHeaders", '{"X-User": "email"}'),
    ("--server.enableStaticServing", "true"),
]


@pytest.mark.parametrize("spelling", ["joined", "separate"])
@pytest.mark.parametrize("option, value", WIDENING, ids=[o for o, _ in WIDENING])
def test_serve_refuses_every_option_that_widens_who_may_connect(option, value, spelling, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.append(argv))
    extra = [f"{option}={value}"] if spelling == "joined" else [option, value]
    assert main(["serve", "--", "--theme.base", "dark", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and option in err and "--host and --port" in err and len(err.splitlines()) == 1, err
    assert started == []
    with pytest.raises(CfdebugError, match=option):
        serve_argv(extra=[option.lower()] + ([value] if spelling == "separate" else []))  # names compare without case


@pytest.mark.parametrize("option, value", WIDENING, ids=[o for o, _ in WIDENING])
def test_serve_refuses_a_widening_option_set_in_the_environment(option, value, monkeypatch):
    variable = "STREAMLIT_" + {
        "--server.corsAllowedOrigins": "SERVER_CORS_ALLOWED_ORIGINS", "--server.enableCORS": "SERVER_ENABLE_CORS",
        "--browser.serverAddress": "BROWSER_SERVER_ADDRESS", "--global.developmentMode": "GLOBAL_DEVELOPMENT_MODE",
        "--server.xsrfCookieSameSite": "SERVER_XSRF_COOKIE_SAME_SITE", "--server.enableAgentApi": "SERVER_ENABLE_AGENT_API",
        "--server.trustedUserHeaders": "SERVER_TRUSTED_USER_HEADERS", "--server.enableStaticServing": "SERVER_ENABLE_STATIC_SERVING",
    }[option]
    monkeypatch.setenv(variable, value)
    if option == "--server.enableCORS":  # given on the command line, which wins over the variable
        argv, _ = serve_argv()
        assert dict(zip(argv[5::2], argv[6::2]))["--server.enableCORS"] == "true"
        return
    with pytest.raises(CfdebugError, match=variable):
        serve_argv()


def test_serve_command_warns_when_shared_without_read_only(monkeypatch, capsys):
    started = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.append((argv, env)))
    assert main(["serve", "--host", "0.0.0.0", "--port", "8600", "--", "--theme.base", "dark"]) == 0
    err = capsys.readouterr().err
    assert err.strip() == f"warning: {SHARING_WARNING.format(host='0.0.0.0', port=8600)}"
    assert started[0][0][-2:] == ["--theme.base", "dark"]
    for argv in (["serve"], ["serve", "--host", "0.0.0.0", "--read-only"], ["serve", "--host", "::1"]):
        assert main(argv) == 0 and not capsys.readouterr().err, argv
    assert main(["serve", "--root", "/no/such/folder"]) == 2
    assert [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost", "0.0.0.0", "::", "example.org")] == [
        True, True, True, True, False, False, False]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # kernel words are little-endian
                found.add(str(ipaddress.ip_address(words)))
    return found


@pytest.mark.slow
def test_bare_streamlit_run_listens_on_loopback_only(tmp_path):
    """`streamlit run app.py` with no address flag: .streamlit/config.toml decides the bind address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, CFDEBUG_HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port)]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):  # up to about 2 minutes on a loaded machine; not a timing assertion
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, (tmp_path / "log").read_text()
                time.sleep(0.5)
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(30)
