"""The artifact cache and the atomic writers: nothing half-written on an exception or under
concurrent writers, JSON-ready values, and Store round trips."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from cfdebug.errors import CfdebugError
from cfdebug.store import Store, atomic_file, json_text, jsonable, stable_hash, torch_save_atomic, write_json_atomic, write_text_atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


# ---------------------------------------------------------------------------------- atomic files
def test_atomic_file_replaces_the_file_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("new")
        assert not path.exists()  # nothing visible before the block ends
    assert path.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_atomic_file_leaves_nothing_on_an_exception(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(path) as tmp:
            tmp.write_text("half of a new fi")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []
    fresh = tmp_path / "never.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(fresh) as tmp:
            tmp.write_text("x")
            raise KeyboardInterrupt
    assert not fresh.exists() and _leftovers(tmp_path) == []


def test_text_json_and_torch_writers_round_trip(tmp_path):
    write_text_atomic(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text() == "héllo\n"
    write_json_atomic(tmp_path / "j.json", {"a": np.float32(0.5), "b": np.arange(3), "c": tmp_path})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": str(tmp_path)}
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch_save_atomic(state, tmp_path / "m" / "model.pt")
    assert torch.equal(torch.load(tmp_path / "m" / "model.pt", weights_only=True)["w"], state["w"])
    assert _leftovers(tmp_path) == []


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    path = tmp_path / "shared.txt"
    texts = [str(i) * 200_000 for i in range(8)]
    start = threading.Barrier(len(texts))

    def write(text):
        start.wait()
        for _ in range(5):
            write_text_atomic(path, text)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_text() in texts  # one writer's whole text, never a mix
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------- Store
def test_store_writer_and_load_round_trip(tmp_path):
    store = Store(tmp_path / "home")
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.array([1, 0, 2])}
    assert not store.exists("kind", "k1")
    folder = store.save_arrays("kind", "k1", arrays, {"config": {"a": (1, 2)}, "n": np.int64(3)})
    assert folder == store.path("kind", "k1") and store.exists("kind", "k1")
    loaded, meta = store.load_arrays("kind", "k1")
    assert set(loaded) == {"x", "y"}
    np.testing.assert_array_equal(loaded["x"], arrays["x"])
    assert meta == {"config": {"a": [1, 2]}, "n": 3} == store.load_meta("kind", "k1")
    mapped, _ = store.load_arrays("kind", "k1", mmap=True)
    assert isinstance(mapped["x"], np.memmap) and not mapped["x"].flags.writeable
    with store.writer("kind", "k2", {"note": "text"}) as tmp:
        (tmp / "result.json").write_text("{}")
        assert not store.exists("kind", "k2")
    assert (store.path("kind", "k2") / "result.json").read_text() == "{}"
    assert _leftovers(tmp_path) == []


def test_store_writer_leaves_nothing_on_an_exception(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError):
        with store.writer("kind", "key", {}) as tmp:
            np.save(tmp / "a.npy", np.zeros(3))
            raise ValueError("killed mid-write")
    assert not store.exists("kind", "key") and not store.path("kind", "key").exists()
    assert _leftovers(tmp_path) == []


def test_two_writers_of_one_artifact_the_first_complete_wins(tmp_path):
    store = Store(tmp_path)
    with store.writer("kind", "key", {"who": "first"}) as first:
        (first / "v.txt").write_text("first")
        with store.writer("kind", "key", {"who": "second"}) as second:
            (second / "v.txt").write_text("second")
    # The second finished first; the first's rename finds the artifact and drops its copy.
    assert store.load_meta("kind", "key") == {"who": "second"}
    assert (store.path("kind", "key") / "v.txt").read_text() == "second"
    assert _leftovers(tmp_path) == []


def test_concurrent_store_writers(tmp_path):
    store = Store(tmp_path)
    start = threading.Barrier(6)
    errors = []

    def write(i):
        try:
            start.wait()
            store.save_arrays("kind", "same", {"a": np.full(50_000, i)}, {"i": i})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    arrays, meta = store.load_arrays("kind", "same")
    assert (arrays["a"] == meta["i"]).all()  # one writer's arrays with that writer's meta
    assert _leftovers(tmp_path) == []


def test_store_on_an_unusable_workdir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CfdebugError, match="--workdir"):
        Store(blocker)


# ---------------------------------------------------------------------------------- values
# ------------------------------------------------------------------- full and read-only disks
@pytest.mark.parametrize("code, needles", [
    (errno.ENOSPC, ["5 B free on the disk holding", "full", "free)"]),
    (errno.EDQUOT, ["5 B free on the disk holding", "full"]),
    (errno.EROFS, ["read-only"]),
], ids=["full", "over-quota", "read-only"])
def test_atomic_file_turns_a_refusing_disk_into_one_user_error(tmp_path, code, needles):
    path = tmp_path / "out.txt"
    with pytest.raises(CfdebugError) as err:
        with atomic_file(path, size=5) as tmp:
            tmp.write_text("hello")
            raise OSError(code, os.strerror(code))
    assert str(path) in str(err.value) and all(n in str(err.value) for n in needles), str(err.value)
    assert not path.exists() and _leftovers(tmp_path) == []


def test_atomic_file_keeps_other_os_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_file(tmp_path / "out.txt"):
            raise FileNotFoundError(errno.ENOENT, "gone")


def test_store_writer_on_a_full_disk_is_a_user_error_naming_the_free_space(tmp_path):
    store = Store(tmp_path / "home")
    with pytest.raises(CfdebugError, match=r"Expected room on the disk holding .*/objects/k/abc, but it is full .* free\)"):
        with store.writer("k", "abc", {}):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list((tmp_path / "home" / "objects" / "k").iterdir()) == []


# ------------------------------------------------------------- leftovers of dead writers
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sweep_removes_a_dead_writers_folder_and_keeps_the_rest(tmp_path):
    from cfdebug.store import _host_tag

    store = Store(tmp_path / "home")
    kind = tmp_path / "home" / "objects" / "k"
    kept = ["abc", f".tmp-abc-0badf00d-{os.getpid()}-0-{_host_tag()}", ".tmp-abc-0badf00d-1-0-ffffffff", ".tmp-abc-0badf00d"]
    gone = [f".tmp-abc-0badf00d-{_dead_pid()}-0-{_host_tag()}", ".bad-abc-0badf00d", ".tmp-old-0badf00d"]
    for name in kept + gone:
        (kind / name).mkdir(parents=True)
        (kind / name / "x.npy").write_bytes(b"x")
    day_old = time.time() - 25 * 3600  # an older cfdebug's temporary folder (no owner in its name)
    os.utime(kind / ".tmp-old-0badf00d", (day_old, day_old))
    assert sorted(p.name for p in store.sweep()) == sorted(gone)
    assert sorted(p.name for p in kind.iterdir()) == sorted(kept)  # live, another host's, recent unowned


def test_a_reused_pid_does_not_keep_a_dead_writers_folder(tmp_path):
    from cfdebug.procs import proc_stat
    from cfdebug.store import _host_tag

    start = int(proc_stat(os.getpid()).start)
    name = f".tmp-abc-0badf00d-{os.getpid()}-{start + 1}-{_host_tag()}"  # our pid, another process's start
    (tmp_path / "home" / "objects" / "k" / name).mkdir(parents=True)
    assert [p.name for p in Store(tmp_path / "home").sweep()] == []  # the constructor swept it already
    assert not (tmp_path / "home" / "objects" / "k" / name).exists()


def test_only_the_files_the_manifest_lists_are_loaded(tmp_path):
    store = Store(tmp_path)
    store.save_arrays("k", "abc", {"a": np.arange(3)}, {"m": 1})
    np.save(store.path("k", "abc") / "b.npy", np.arange(4))
    assert store.exists("k", "abc")
    arrays, _ = store.load_arrays("k", "abc")
    assert list(arrays) == ["a"]


def test_jsonable_gives_plain_json_types():
    value = {
        1: (np.int64(2), np.float32(0.5), np.bool_(True)),
        "arr": np.array([[1.0, np.nan], [np.inf, -0.0]]),
        "nested": [{"t": (1, 2)}, float("-inf")],
        "s": "x",
        "none": None,
    }
    out = jsonable(value)
    assert out == {"1": [2, 0.5, True], "arr": [[1.0, None], [None, -0.0]], "nested": [{"t": [1, 2]}, None], "s": "x", "none": None}
    assert type(out["1"][0]) is int and type(out["1"][2]) is bool
    json.dumps(out, allow_nan=False)
    assert math.isnan(value["arr"][0, 1])  # input untouched


def _strict_json(text: str):
    """``text`` parsed as RFC 8259 JSON: a NaN/Infinity literal raises, as in other tools' parsers."""

    def refuse(literal):
        raise ValueError(f"not JSON: {literal}")

    return json.loads(text, parse_constant=refuse)


NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "ninf": -float("inf"), "arr": np.array([np.nan, 1.5], dtype=np.float32)}


def test_json_text_writes_null_for_non_finite_floats_by_default():
    assert _strict_json(json_text(NON_FINITE)) == {"nan": None, "inf": None, "ninf": None, "arr": [None, 1.5]}
    with pytest.raises(ValueError, match="not JSON: NaN"):
        _strict_json(json.dumps({"a": float("nan")}))  # the parser above does refuse the literal


def test_json_text_keeps_nan_literals_when_asked_and_they_read_back_as_floats():
    text = json_text(NON_FINITE, keep_nan=True)
    assert "NaN" in text and "-Infinity" in text
    back = json.loads(text)
    assert math.isnan(back["nan"]) and back["inf"] == float("inf") and back["ninf"] == -float("inf")
    assert math.isnan(back["arr"][0]) and back["arr"][1] == 1.5


def test_json_text_converts_tensors_paths_and_numpy_and_refuses_the_rest(tmp_path):
    value = {"t": torch.tensor(0.25), "v": torch.arange(3), "p": tmp_path, "i": np.int64(7), "f": np.float64(0.5), "s": np.str_("x")}
    assert json.loads(json_text(value)) == {"t": 0.25, "v": [0, 1, 2], "p": str(tmp_path), "i": 7, "f": 0.5, "s": "x"}
    assert type(jsonable(value)["f"]) is float and type(jsonable(value)["s"]) is str
    with pytest.raises(CfdebugError, match=r"Expected the progress row to hold only JSON values .* holds a set"):
        json_text({"a": {1, 2}}, what="progress row")


def test_write_json_atomic_writes_valid_json_and_meta_json_keeps_nan(tmp_path):
    write_json_atomic(tmp_path / "out.json", {"ece": float("nan"), "acc": 0.5})
    assert _strict_json((tmp_path / "out.json").read_text()) == {"ece": None, "acc": 0.5}
    store = Store(tmp_path / "work")
    store.save_arrays("k", "abc", {"a": np.zeros(2)}, {"test_acc": float("nan")})
    assert math.isnan(store.load_meta("k", "abc")["test_acc"])  # a cache hit gives back what was stored
    assert store.exists("k", "abc")


def test_stable_hash_ignores_dict_order_and_sees_values():
    assert stable_hash({"a": 1, "b": [1, 2]}, "x") == stable_hash({"b": [1, 2], "a": 1}, "x")
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash("anything")) == 20
