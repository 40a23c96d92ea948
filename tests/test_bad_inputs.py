"""The bad-input corpus (DESIGN.md house style 10): every mistake a user can make, or damage a
cache can suffer, ends in one clear ``error:`` line and exit 2 (or a counted ``warning:`` and a
correct result), never a traceback, and leaves nothing half-written in the workdir.

Each case builds its bad file in ``tmp_path`` (tiny ImageFolder trees of 8×8 PNGs, small
checkpoints) and drives the CLI in-process (``cli.main``).
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tmpfs
import torch
from PIL import Image

from cfdebug.cli import main
from cfdebug.models import DemoCNN

# ------------------------------------------------------------------------------------ builders
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]


def tiny_tree(root: Path, classes=("a", "b"), n_train=3, n_test=2, size=8) -> Path:
    """``root/{train,test}/<class>/<i>.png``: solid-colour 8×8 RGB images, one colour per class."""
    for split, n in (("train", n_train), ("test", n_test)):
        for k, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = tuple(min(255, c + 5 * i) for c in COLOURS[k % len(COLOURS)])
                Image.new("RGB", (size, size), colour).save(folder / f"{i}.png")
    return root


def demo_checkpoint(path: Path, num_classes=2, scale: float | None = None, fill: float | None = None) -> Path:
    torch.manual_seed(0)
    state = DemoCNN(num_classes).state_dict()
    if scale is not None:
        state = {k: v * scale if v.is_floating_point() else v for k, v in state.items()}
    if fill is not None:
        state["features.0.weight"][0, 0, 0, 0] = fill
        state["classifier.bias"][1] = fill
    torch.save(state, path)
    return path


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cfdebug-pwned",))


def _cub(root: Path, classes_txt="1 a\n2 b\n", labels_txt=None) -> Path:
    (root / "images" / "a").mkdir(parents=True)
    (root / "images" / "b").mkdir(parents=True)
    for i, cls in enumerate(["a", "a", "b", "b"], start=1):
        Image.new("RGB", (8, 8), COLOURS[i % 2]).save(root / "images" / cls / f"{i}.png")
    (root / "images.txt").write_text("".join(f"{i} {c}/{i}.png\n" for i, c in enumerate(["a", "a", "b", "b"], start=1)))
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    (root / "image_class_labels.txt").write_text(labels_txt or "1 1\n2 1\n3 2\n4 2\n")
    (root / "classes.txt").write_text(classes_txt)
    return root


# ------------------------------------------------------------------------------------ harness
@pytest.fixture
def cli(tmp_path, capsys):
    """``cli(*argv) -> (rc, out, err)`` with a private workdir, CPU and no progress lines."""
    home = tmp_path / "home"

    def _run(*argv, workdir=True):
        argv = list(argv)
        if workdir:
            argv[1:1] = ["--workdir", str(home), "--device", "cpu", "--quiet"]
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
        return rc, out, err

    _run.home = home
    return _run


def assert_one_error(rc: int, err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    return errors[0]


def assert_warned(rc: int, err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings, err
    assert not [line for line in err.splitlines() if line.startswith("error:")], err
    line = next((w for w in warnings if all(n.lower() in w.lower() for n in needles)), None)
    assert line is not None, (needles, err)
    return line


def assert_nothing_half_written(home: Path) -> None:
    if not home.exists():
        return
    leftovers = [str(p) for p in home.rglob("*") if ".tmp" in p.name or p.name.startswith(".bad-")]
    assert leftovers == [], leftovers
    objects = home / "objects"
    if objects.is_dir():
        for kind in objects.iterdir():
            if kind.is_dir():
                for artifact in kind.iterdir():
                    assert (artifact / "manifest.json").is_file(), f"incomplete artifact {artifact}"


def registry_rows(home: Path) -> int:
    db = home / "runs.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


# -------------------------------------------------------------------- the error corpus (exit 2)
def _tree(t):
    return tiny_tree(t / "data")


def _ckpt(t, **kw):
    return demo_checkpoint(t / "w.pt", **kw)


def _extract(t, data=None, weights=None, *extra):
    data = data or _tree(t)
    weights = weights or _ckpt(t)
    return ["extract", "--data", str(data), "--weights", str(weights), "--input-size", "8", "--splits", "test", *extra]


def _one_class(t):
    return _extract(t, tiny_tree(t / "one", classes=("only",)))


def _empty_class(t):
    root = _tree(t)
    (root / "train" / "c").mkdir()
    return _extract(t, root)


def _unknown_test_class(t):
    root = _tree(t)
    (root / "test" / "zz").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "zz" / "0.png")
    return _extract(t, root)


def _no_test(t):
    root = _tree(t)
    for p in (root / "test").rglob("*.png"):
        p.unlink()
    for p in sorted((root / "test").rglob("*"), reverse=True):
        p.rmdir()
    (root / "test").rmdir()
    return _extract(t, root)


def _truncated_png(t):
    root = _tree(t)
    path = root / "test" / "a" / "0.png"
    path.write_bytes(path.read_bytes()[:30])
    return _extract(t, root)


def _garbage_png(t):
    root = _tree(t)
    (root / "test" / "a" / "0.png").write_bytes(os.urandom(200))
    return _extract(t, root)


def _bomb(t):
    root = _tree(t)
    # 16384² one-bit pixels (268 M > Pillow's 179 M bomb limit) compress to a few kilobytes
    Image.new("1", (16384, 16384)).save(root / "test" / "a" / "0.png", optimize=False)
    return _extract(t, root)


def _empty_folder(t):
    (t / "empty").mkdir()
    return _extract(t, t / "empty")


def _data_is_file(t):
    (t / "file.txt").write_text("x")
    return _extract(t, t / "file.txt")


def _wrong_format(t):
    return _extract(t, _tree(t), None, "--format", "cub")


def _cub_bad_class_id(t):
    return _extract(t, _cub(t / "cub", classes_txt="1 a\nbee b\n"))


def _cub_bad_label(t):
    return _extract(t, _cub(t / "cub", labels_txt="1 1\n2 one\n3 2\n4 2\n"))


def _cub_missing_image(t):
    root = _cub(t / "cub")
    (root / "images" / "b" / "4.png").unlink()
    return _extract(t, root)


def _cifar_exploit(t):
    (t / "cifar").mkdir()
    (t / "cifar" / "data_batch_1").write_bytes(pickle.dumps(_Exploit()))
    return _extract(t, t / "cifar")


def _cifar_bad_shape(t):
    (t / "cifar").mkdir()
    batch = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 0, 1]}
    for name in ("data_batch_1", "test_batch"):
        (t / "cifar" / name).write_bytes(pickle.dumps(batch))
    return _extract(t, t / "cifar")


def _weights_missing(t):
    return _extract(t, None, t / "nope.pt")


def _weights_dir(t):
    (t / "wdir").mkdir()
    return _extract(t, None, t / "wdir")


def _weights_random(t):
    (t / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return _extract(t, None, t / "random.pt")


def _weights_text(t):
    (t / "notes.pt").write_text("these are not weights\n" * 20)
    return _extract(t, None, t / "notes.pt")


def _weights_empty(t):
    (t / "empty.pt").write_bytes(b"")
    return _extract(t, None, t / "empty.pt")


def _weights_truncated(t):
    path = _ckpt(t)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _extract(t, None, path)


def _weights_exploit(t):
    torch.save({"features.0.weight": _Exploit()}, t / "evil.pt")
    return _extract(t, None, t / "evil.pt")


def _weights_not_tensors(t):
    torch.save({"features.0.weight": [1, 2, 3]}, t / "list.pt")
    return _extract(t, None, t / "list.pt")


def _weights_wrong_arch(t):
    torch.save(torch.nn.Linear(4, 2).state_dict(), t / "linear.pt")
    return _extract(t, None, t / "linear.pt")


def _weights_wrong_classes(t):
    return _extract(t, None, demo_checkpoint(t / "w3.pt", num_classes=3))


def _weights_nan(t):
    return _extract(t, None, _ckpt(t, fill=float("nan")))


def _weights_inf(t):
    return _extract(t, None, _ckpt(t, fill=float("inf")))


def _weights_overflow(t):
    # every weight finite, but 1e30 × 1e30 overflows: the logits are not finite
    return _extract(t, None, _ckpt(t, scale=1e30))


def _opt(*flags):
    return lambda t: _extract(t, None, None, *flags)


def _train_out_dir(t):
    (t / "outdir").mkdir()
    return ["train", "--data", str(_tree(t)), "--input-size", "8", "--epochs", "1", "--out", str(t / "outdir")]


def _train_out_under_file(t):
    (t / "afile").write_text("x")
    return ["train", "--data", str(_tree(t)), "--input-size", "8", "--epochs", "1", "--out", str(t / "afile" / "w.pt")]


def _json_dir(t):
    (t / "jsondir").mkdir()
    return _extract(t, None, None, "--json", str(t / "jsondir"))


def _csv_dir(t):
    (t / "csvdir").mkdir()
    return ["detect", "--data", str(_tree(t)), "--weights", str(_ckpt(t)), "--input-size", "8", "--csv", str(t / "csvdir")]


def _splits_bogus(t):
    return _extract(t, None, None)[:-2] + ["--splits", "test,bogus"]


def _treat_epochs_0(t):
    return ["treat", "--data", str(_tree(t)), "--weights", str(_ckpt(t)), "--input-size", "8", "--treat-epochs", "0"]


def _treat_train_epochs_0(t):
    return ["treat", "--data", str(_tree(t)), "--input-size", "8", "--epochs", "0"]


def _treat_lambda_out_of_range(t):
    return ["treat", "--lambda1", "5"]


def _treat_resume_unknown(t):
    return ["treat", "--resume", "treat-nope"]


def _treat_config_missing(t):
    return ["treat", "--config", str(t / "run.json")]


def _treat_config_not_json(t):
    (t / "run.json").write_text("{not json")
    return ["treat", "--config", str(t / "run.json")]


def _runs_cancel_unknown(t):
    return ["runs", "--cancel", "nope"]


def _export_not_empty(t):
    (t / "full").mkdir()
    (t / "full" / "x.txt").write_text("keep me")
    return ["export-demo", str(t / "full")]


def _report_markdown_missing(t):
    return ["report", "--markdown", str(t / "README-missing.md")]


LONG_NAME = "a" * 5000  # longer than any path the system takes (PATH_MAX 4096, NAME_MAX 255)


def _long_weights(t):
    return _extract(t, None, t / LONG_NAME)


def _long_data(t):
    return _extract(t, t / LONG_NAME)


def _long_json(t):
    return _extract(t, None, None, "--json", str(t / LONG_NAME))


def _train_seed_2_63(t):
    return ["train", "--data", str(_tree(t)), "--input-size", "8", "--epochs", "1", "--seed", str(2**63)]


def _treat_seeds_2_64(t):
    return ["treat", "--data", str(_tree(t)), "--input-size", "8", "--epochs", "1", "--treat-epochs", "1", "--seeds", f"0,{2**64}"]


def _report_seeds_2_63(t):
    return ["report", "--claims", "treatment", "--data", str(_tree(t)), "--input-size", "8", "--epochs", "1",
            "--treat-epochs", "1", "--seeds", str(2**63)]


def _report_lambda1_empty(t):
    return ["report", "--claims", "treatment", "--lambda1", ""]


def _json_under_proc(t):
    return _extract(t, None, None, "--json", "/proc/cfdebug-out.json")


def _report_markdown_dir(t):
    (t / "mdir").mkdir()
    return ["report", "--markdown", str(t / "mdir")]


def _cifar_test_class_not_in_train(t):
    (t / "cifar").mkdir()
    batches = {"data_batch_1": [0, 1, 0, 1], "test_batch": [0, 1, 2, 2]}
    for name, labels in batches.items():
        batch = {b"data": np.zeros((len(labels), 3072), np.uint8), b"labels": labels}
        (t / "cifar" / name).write_bytes(pickle.dumps(batch))
    (t / "cifar" / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog", b"eel"]}))
    return _extract(t, t / "cifar")


def _runs_kind_bogus(t):
    return ["runs", "--kind", "bogus"]


# (id, builder, needles in the error line, whether the builder's argv takes the workdir options)
ERROR_CASES = [
    ("data-missing", lambda t: _extract(t, t / "nowhere"), ["does not exist"]),
    ("data-is-file", _data_is_file, ["folder"]),
    ("data-empty-folder", _empty_folder, ["layout"]),
    ("data-no-test", _no_test, ["test"]),
    ("data-one-class", _one_class, ["one class", "at least 2"]),
    ("data-empty-class-folder", _empty_class, ["no images"]),
    ("data-unknown-test-class", _unknown_test_class, ["zz"]),
    ("data-wrong-format", _wrong_format, ["images.txt"]),
    ("image-truncated", _truncated_png, ["0.png"]),
    ("image-garbage", _garbage_png, ["0.png"]),
    ("image-bomb", _bomb, ["decompression bomb"]),
    ("cub-class-id-not-integer", _cub_bad_class_id, ["classes.txt", "bee"]),
    ("cub-label-not-integer", _cub_bad_label, ["image_class_labels.txt", "one"]),
    ("cub-missing-image", _cub_missing_image, ["4.png"]),
    ("cifar-malicious-pickle", _cifar_exploit, ["refusing", "system"]),
    ("cifar-bad-shape", _cifar_bad_shape, ["3072"]),
    ("weights-missing", _weights_missing, ["nope.pt", "does not exist"]),
    ("weights-directory", _weights_dir, ["wdir", "is a directory"]),
    ("weights-random-bytes", _weights_random, ["not a checkpoint"]),
    ("weights-text", _weights_text, ["not a checkpoint"]),
    ("weights-empty", _weights_empty, ["empty"]),
    ("weights-truncated", _weights_truncated, ["w.pt"]),
    ("weights-malicious-pickle", _weights_exploit, ["pickled python objects"]),
    ("weights-not-tensors", _weights_not_tensors, ["not a state_dict"]),
    ("weights-wrong-architecture", _weights_wrong_arch, ["missing keys"]),
    ("weights-wrong-class-count", _weights_wrong_classes, ["classifier.weight", "(3, 64)"]),
    ("weights-nan", _weights_nan, ["not finite", "features.0.weight", "classifier.bias"]),
    ("weights-inf", _weights_inf, ["not finite", "features.0.weight"]),
    ("weights-overflow", _weights_overflow, ["not finite", "logits"]),
    ("device-bogus", _opt("--device", "bogus"), ["--device"]),
    ("device-cpu-abc", _opt("--device", "cpu:abc"), ["--device", "cpu:abc"]),
    ("device-cuda-abc", _opt("--device", "cuda:abc"), ["--device"]),
    ("layer-empty", _opt("--layer", ""), ["--layer"]),
    ("layer-blank", _opt("--layer", "  "), ["--layer"]),
    ("layer-unknown", _opt("--layer", "features.99"), ["features.99"]),
    ("input-size-tiny", _opt("--input-size", "2"), ["--input-size"]),
    ("input-size-absurd", _opt("--input-size", "1000000"), ["--input-size", "4096"]),
    ("batch-size-0", _opt("--batch-size", "0"), ["--batch-size"]),
    ("bias-out-of-range", _opt("--bias", "2"), ["--bias"]),
    ("val-fraction-1", _opt("--val-fraction", "1"), ["--val-fraction", "[0, 1)", "above 0 for a dataset without a val/"]),
    ("val-fraction-0", _opt("--val-fraction", "0"), ["--val-fraction", "[0, 1)", "above 0 for a dataset without a val/"]),
    ("splits-bogus", _splits_bogus, ["bogus"]),
    ("json-is-directory", _json_dir, ["--json", "directory"]),
    ("csv-is-directory", _csv_dir, ["--csv", "directory"]),
    ("train-out-is-directory", _train_out_dir, ["--out", "directory"]),
    ("train-out-under-file", _train_out_under_file, ["--out", "afile"]),
    ("treat-epochs-0", _treat_epochs_0, ["--treat-epochs"]),
    ("treat-train-epochs-0", _treat_train_epochs_0, ["--epochs"]),
    ("treat-lambda-out-of-range", _treat_lambda_out_of_range, ["--lambda1"]),
    ("treat-resume-unknown", _treat_resume_unknown, ["treat-nope"]),
    ("treat-config-missing", _treat_config_missing, ["run.json", "does not exist"]),
    ("treat-config-not-json", _treat_config_not_json, ["run.json", "JSON"]),
    ("runs-cancel-unknown", _runs_cancel_unknown, ["nope"]),
    ("export-demo-not-empty", _export_not_empty, ["full"]),
    ("report-markdown-missing", _report_markdown_missing, ["README-missing.md"]),
    ("report-markdown-directory", _report_markdown_dir, ["--markdown", "mdir", "is a directory"]),
    ("weights-path-too-long", _long_weights, ["--weights", "4096", "5,0"]),
    ("data-path-too-long", _long_data, ["--data", "4096", "5,0"]),
    ("json-path-too-long", _long_json, ["--json", "4096", "5,0"]),
    ("train-seed-2^63", _train_seed_2_63, ["--seed", "below 2^63", str(2**63)]),
    ("treat-seeds-2^64", _treat_seeds_2_64, ["--seeds", "below 2^63", str(2**64)]),
    ("report-seeds-2^63", _report_seeds_2_63, ["--seeds", "below 2^63"]),
    ("report-lambda1-empty", _report_lambda1_empty, ["--lambda1", "at least one"]),
    ("json-under-proc", _json_under_proc, ["--json", "/proc"]),
    ("cifar-test-class-not-in-train", _cifar_test_class_not_in_train, ["eel (label 2)", "training images", "test batch holds 2"]),
    ("runs-kind-bogus", _runs_kind_bogus, ["--kind", "bogus", "treat, xcr, revise, prepare"]),
]
_NO_DEVICE_OPTS = {"runs-cancel-unknown", "runs-kind-bogus", "export-demo-not-empty"}


@pytest.mark.parametrize("build, needles", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_input_is_one_error_line(cli, tmp_path, request, build, needles):
    argv = build(tmp_path)
    case = request.node.callspec.id
    if case in _NO_DEVICE_OPTS:
        argv = argv[:1] + (["--workdir", str(cli.home)] if case.startswith("runs") else []) + argv[1:]
    rc, out, err = cli(*argv, workdir=case not in _NO_DEVICE_OPTS)
    assert_one_error(rc, err, *needles)
    assert_nothing_half_written(cli.home)
    assert registry_rows(cli.home) == 0
    assert not Path("/tmp/cfdebug-pwned").exists()
    if case.startswith("train-out"):
        assert not (cli.home / "objects" / "models").exists()  # checked before training


# -------------------------------------------- damaged caches: warn, discard, recompute (exit 0)
def _extract_json(cli, tmp_path, argv, name):
    out = tmp_path / f"{name}.json"
    rc, _, err = cli(*argv, "--json", str(out))
    return rc, err, json.loads(out.read_text()) if rc == 0 else None


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _same_size_garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))


def _remove(path: Path) -> None:
    path.unlink()


CACHE_DAMAGE = [
    ("features-npy-truncated", "features.npy", _truncate, ["features.npy", "truncated"]),
    ("logits-npy-same-size-garbage", "logits.npy", _same_size_garbage, ["logits.npy", "SHA-256"]),
    ("meta-json-garbage", "meta.json", _same_size_garbage, ["meta.json", "SHA-256"]),
    ("labels-npy-missing", "labels.npy", _remove, ["labels.npy", "missing"]),
    ("manifest-missing", "manifest.json", _remove, ["manifest.json"]),
    ("manifest-garbage", "manifest.json", _same_size_garbage, ["manifest.json", "unreadable"]),
]


@pytest.mark.parametrize("name, damage, needles", [c[1:] for c in CACHE_DAMAGE], ids=[c[0] for c in CACHE_DAMAGE])
def test_damaged_extraction_is_discarded_and_recomputed(cli, tmp_path, name, damage, needles):
    argv = _extract(tmp_path)
    rc, err, first = _extract_json(cli, tmp_path, argv, "first")
    assert rc == 0 and "warning" not in err, err
    artifact = Path(first["splits"]["test"]["artifact"])
    features = np.load(artifact / "features.npy")
    damage(artifact / name)
    rc, err, second = _extract_json(cli, tmp_path, argv, "second")
    assert_warned(rc, err, "discarding", *needles)
    assert second["splits"]["test"]["cache_hit"] is False
    assert second["splits"]["test"]["accuracy"] == first["splits"]["test"]["accuracy"]
    np.testing.assert_array_equal(np.load(artifact / "features.npy"), features)
    rc, err, third = _extract_json(cli, tmp_path, argv, "third")
    assert rc == 0 and "warning" not in err and third["splits"]["test"]["cache_hit"] is True, err
    assert_nothing_half_written(cli.home)


def test_truncated_cached_model_is_retrained_to_the_same_weights(cli, tmp_path):
    argv = ["train", "--data", str(_tree(tmp_path)), "--input-size", "8", "--epochs", "1"]
    rc, out, err = cli(*argv, "--out", str(tmp_path / "first.pt"))
    assert rc == 0 and "trained" in out, err
    (cached,) = (cli.home / "objects" / "models").glob("*/model.pt")
    _truncate(cached)
    rc, out, err = cli(*argv, "--out", str(tmp_path / "second.pt"))
    assert_warned(rc, err, "discarding", "model.pt", "truncated")
    assert "model trained" in out
    first, second = (torch.load(tmp_path / f, weights_only=True) for f in ("first.pt", "second.pt"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert_nothing_half_written(cli.home)


# ---------------------------------------- a file where the cache expects a folder, read-only
def test_file_where_the_cache_kind_folder_goes(cli, tmp_path):
    (cli.home / "objects").mkdir(parents=True)
    (cli.home / "objects" / "extract").write_text("in the way")
    assert_one_error(*cli(*_extract(tmp_path))[::2], "objects/extract", "--workdir")
    assert_nothing_half_written(cli.home)


def test_file_where_an_artifact_folder_goes(cli, tmp_path):
    argv = _extract(tmp_path)
    rc, err, first = _extract_json(cli, tmp_path, argv, "first")
    artifact = Path(first["splits"]["test"]["artifact"])
    for p in artifact.iterdir():
        p.unlink()
    artifact.rmdir()
    artifact.write_text("in the way")
    assert_one_error(*cli(*argv)[::2], str(artifact), "a file is there")


def test_workdir_is_a_file(cli, tmp_path):
    cli.home.write_text("not a folder")
    assert_one_error(*cli(*_extract(tmp_path))[::2], "work directory", str(cli.home))


def test_read_only_workdir_on_a_cache_miss(cli, tmp_path, monkeypatch):
    argv = _extract(tmp_path)
    cli.home.mkdir()
    (cli.home / "objects").mkdir()
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):  # as a read-only filesystem answers (the tests may run as root)
        if str(self).startswith(str(cli.home / "objects") + os.sep):  # objects/ itself exists
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert_one_error(*cli(*argv)[::2], "Permission denied", "--workdir")
    monkeypatch.undo()
    assert list((cli.home / "objects").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_workdir_for_real(cli, tmp_path):
    argv = _extract(tmp_path)
    (cli.home / "objects").mkdir(parents=True)
    os.chmod(cli.home / "objects", 0o555)
    try:
        assert_one_error(*cli(*argv)[::2], "--workdir")
    finally:
        os.chmod(cli.home / "objects", 0o755)


# ------------------------------------------------- dataset walking: counted skips (exit 0)
def _self_link(root):
    os.symlink("self.png", root / "train" / "a" / "self.png")


def _dangling_link(root):
    os.symlink(root / "nowhere.png", root / "train" / "a" / "gone.png")


def _folder_loop(root):
    os.symlink("..", root / "train" / "a" / "loop")


def _non_utf8_name(root):
    name = os.fsdecode(b"bad\xff.png")
    Image.new("RGB", (8, 8)).save(root / "train" / "b" / name, format="PNG")


def _notes(root):
    (root / "train" / "a" / "notes.txt").write_text("not an image")


SKIPS = [
    ("self-referencing-symlink", _self_link, ["skipped 1", "self.png", "symlink"]),
    ("dangling-symlink", _dangling_link, ["skipped 1", "gone.png", "symlink"]),
    ("non-utf8-name", _non_utf8_name, ["skipped 1", "bad\\xff.png", "UTF-8"]),
    ("non-image-file", _notes, ["skipped 1", "notes.txt"]),
]


@pytest.mark.parametrize("make, needles", [c[1:] for c in SKIPS], ids=[c[0] for c in SKIPS])
def test_unusable_dataset_files_are_counted_skips(cli, tmp_path, make, needles):
    root = _tree(tmp_path)
    make(root)
    rc, err, report = _extract_json(cli, tmp_path, _extract(tmp_path, root), "r")
    assert_warned(rc, err, "skipped", *needles)
    assert len(report["skipped_files"]) == 1
    assert report["splits"]["test"]["n"] == 4


def test_a_folder_symlink_loop_is_not_followed(cli, tmp_path):
    root = _tree(tmp_path)
    _folder_loop(root)
    rc, out, err = cli(*_extract(tmp_path, root))
    assert rc == 0 and "Traceback" not in err, err


def test_sixteen_bit_images_are_scaled_to_eight_bits(cli, tmp_path):
    from cfdebug.data import read_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 … 65520
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    pixels = np.asarray(read_image(tmp_path / "grey16.png"))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[..., 1], np.rint(ramp * (255 / 65535)).astype(np.uint8))
    assert (pixels == 255).mean() < 0.05  # Pillow's own convert("RGB") clips 98% of them to 255
    root = _tree(tmp_path)
    Image.fromarray(ramp).save(root / "test" / "a" / "0.png")
    rc, out, err = cli(*_extract(tmp_path, root))
    assert rc == 0 and not err.strip(), err


# ------------------------------------------------------------------------------ NaN CFE heads
def test_detect_never_caches_nan_heads(cli, tmp_path, monkeypatch):
    import cfdebug.cfe.cache as cfe  # where mc_heads looks the fit up

    real_fit = cfe.fit_mc_heads

    def diverged(*args, **kwargs):
        heads, history = real_fit(*args, **kwargs)
        with torch.no_grad():
            heads.weight.fill_(float("nan"))
        return heads, history

    monkeypatch.setattr(cfe, "fit_mc_heads", diverged)
    argv = ["detect", "--data", str(_tree(tmp_path)), "--weights", str(_ckpt(tmp_path)), "--input-size", "8", "--cfe-epochs", "1"]
    assert_one_error(*cli(*argv)[::2], "not finite", "weight", "nothing was cached")
    assert not (cli.home / "objects" / "cfe").exists() or not list((cli.home / "objects" / "cfe").iterdir())
    assert not (cli.home / "objects" / "detect").exists()
    assert_nothing_half_written(cli.home)


# --------------------------------------------------------------------------------------- runs
def _registered_treat_run(home: Path):
    from cfdebug.config import DataConfig, ModelConfig, TreatmentSchedule, WorkspaceConfig
    from cfdebug.jobs import treat_spec
    from cfdebug.runs import RunRegistry

    registry = RunRegistry(home)
    ws = WorkspaceConfig(model=ModelConfig(), data=DataConfig(), device="cpu", workdir=str(home))
    return registry, registry.create("treat", treat_spec(ws, TreatmentSchedule(epochs=1), [1e-3], [2e-5], [0])).run_id


def test_resuming_a_run_that_is_still_running_is_refused(cli):
    registry, run_id = _registered_treat_run(cli.home)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        registry.set_status(run_id, "running", pid=owner.pid)
        rc, out, err = cli("treat", "--resume", run_id)
        assert_one_error(rc, err, run_id, "still running", f"pid {owner.pid}")
        record = registry.get(run_id)
        assert record.status == "running" and record.pid == owner.pid
        assert not record.progress_path.exists() and registry.progress(run_id) == []
    finally:
        owner.kill()
        owner.wait()


def test_a_registry_row_whose_config_is_not_json_is_listed_as_unreadable(cli):
    registry, run_id = _registered_treat_run(cli.home)
    with sqlite3.connect(registry.db_path) as conn:
        conn.execute("UPDATE runs SET config = ? WHERE run_id = ?", ("{truncated", run_id))
    rc, out, err = cli("runs", "--workdir", str(cli.home), workdir=False)
    assert rc == 0 and "Traceback" not in err, err
    (line,) = [line for line in out.splitlines() if run_id in line]
    assert "unreadable" in line and "config" in line
    assert_one_error(*cli("treat", "--resume", run_id)[::2], run_id, "unreadable", "new run")


def test_the_launched_process_and_its_children_may_run_their_own_run(cli):
    # launch() records the child it starts (torchrun, say); its workers run under it
    from cfdebug.procs import is_self_or_ancestor

    assert is_self_or_ancestor(os.getpid()) and is_self_or_ancestor(os.getppid())
    child = subprocess.run(
        [sys.executable, "-c", f"from cfdebug.procs import is_self_or_ancestor as f; print(f({os.getpid()}), f(1 << 22))"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
    )
    assert child.stdout.split() == ["True", "False"], child.stderr


def test_both_val_fraction_bounds_give_one_message(cli, tmp_path):
    # 1 is refused before any work, 0 only once the dataset turns out to have no val/ split
    messages = [assert_one_error(*cli(*_opt("--val-fraction", v)(tmp_path))[::2]) for v in ("1", "0")]
    assert messages[0].replace("1.0", "X") == messages[1].replace("0.0", "X")


# ----------------------------------------- names no output can hold, files the manifest lacks
def _non_utf8_class_folders(root: Path) -> None:
    for split in ("train", "test"):
        folder = Path(os.fsdecode(os.path.join(os.fsencode(root / split), b"bad\xff")))
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "0.png")


@pytest.mark.parametrize("output", ["--csv", "--json"])
def test_a_class_folder_whose_name_is_not_utf8_is_a_counted_skip(cli, tmp_path, output):
    root = _tree(tmp_path)
    _non_utf8_class_folders(root)
    out = tmp_path / f"out{output.replace('-', '.')}"
    argv = ["detect", "--data", str(root), "--weights", str(_ckpt(tmp_path)), "--input-size", "8", "--cfe-epochs", "1", output, str(out)]
    rc, _, err = cli(*argv)
    assert_warned(rc, err, "skipped 2", "bad\\xff", "UTF-8")
    text = out.read_text(encoding="utf-8")
    assert "bad" not in text
    if output == "--csv":
        assert sorted(set(line.split(",")[2] for line in text.splitlines()[1:])) == ["a", "b"]


def test_a_dataset_folder_whose_name_is_not_utf8_is_escaped_in_the_csv(cli, tmp_path):
    root = tiny_tree(Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"data\xff"))))
    argv = ["detect", "--data", str(root), "--weights", str(_ckpt(tmp_path)), "--input-size", "8", "--cfe-epochs", "1", "--csv", str(tmp_path / "out.csv")]
    rc, _, err = cli(*argv)
    assert rc == 0 and "Traceback" not in err and "error:" not in err, err
    rows = (tmp_path / "out.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(rows) == 4 and all("data\\xff/test/" in row for row in rows)


def _garbage_npy(path: Path) -> None:
    path.write_bytes(np.random.default_rng(2).bytes(300))


def _pickled_npy(path: Path) -> None:
    np.save(path, np.array([_Exploit()], dtype=object), allow_pickle=True)


@pytest.mark.parametrize("make", [_garbage_npy, _pickled_npy], ids=["garbage", "pickled-objects"])
def test_a_cache_file_the_manifest_does_not_list_is_never_loaded(cli, tmp_path, make):
    argv = _extract(tmp_path)
    rc, err, first = _extract_json(cli, tmp_path, argv, "first")
    artifact = Path(first["splits"]["test"]["artifact"])
    make(artifact / "planted.npy")
    rc, err, second = _extract_json(cli, tmp_path, argv, "second")
    assert rc == 0 and "Traceback" not in err and "warning" not in err, err
    assert second["splits"]["test"]["cache_hit"] is True
    assert second["splits"]["test"]["accuracy"] == first["splits"]["test"]["accuracy"]
    assert not Path("/tmp/cfdebug-pwned").exists()


# ------------------------------------------------------------- the dashboard's path check
@pytest.mark.parametrize("field", ["weights", "data"])
def test_a_dashboard_path_too_long_is_refused_by_length(field, monkeypatch):
    from cfdebug.access import check_workspace
    from cfdebug.config import DataConfig, ModelConfig, WorkspaceConfig
    from cfdebug.errors import CfdebugError

    monkeypatch.delenv("CFDEBUG_READ_ONLY", raising=False)
    long = "a" * 20_000  # a ?weights= or ?data= URL parameter; relative, so "inside" the start folder
    cfg = WorkspaceConfig(model=ModelConfig(weights=long if field == "weights" else None),
                          data=DataConfig(source=long if field == "data" else "biased-digits"))
    with pytest.raises(CfdebugError, match=r"fewer than 4096 bytes.*20,000 bytes") as err:
        check_workspace(cfg)
    assert "aaaa" not in str(err.value)


# ----------------------------------------------- full and read-only disks, killed writers
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at ``tmp_path/disk``: skipped where it cannot be mounted (not root, no mount)."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        yield disk


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until ``leave`` bytes are free."""
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * (st.f_bavail * st.f_frsize - leave))


def _cfdebug(*argv, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m cfdebug ARGV`` in a fresh process (a SIGBUS there is a failed case, not a dead
    test run); ``prelude`` runs first in that process."""
    code = f"import sys\n{prelude}\nfrom cfdebug.cli import main\nsys.exit(main({list(argv)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def _disk_extract(t, disk):
    data = tiny_tree(t / "data200", n_test=100)  # features 200 × 64 float32: 50 KiB, more than is left
    return ["extract", "--workdir", str(disk / "home"), "--device", "cpu", "--quiet", "--data", str(data),
            "--weights", str(_ckpt(t)), "--input-size", "8", "--splits", "test"]


def _disk_detect_csv(t, disk):
    return ["detect", "--workdir", str(t / "home"), "--device", "cpu", "--quiet", "--data", str(_tree(t)),
            "--weights", str(_ckpt(t)), "--input-size", "8", "--cfe-epochs", "1", "--csv", str(disk / "flags.csv")]


def _disk_models_json(t, disk):
    return ["models", "--json", str(disk / "models.json")]


def _disk_export(t, disk):
    return ["export-demo", str(disk / "digits")]


# Writing a memory map past a full disk's last page killed extract with SIGBUS (exit 135, a
# .tmp folder left); the others ended in OSError tracebacks. The reservation case skips the
# free-space check, as when another writer fills the disk between the check and the writes.
_SKIP_FREE_CHECK = "import shutil\nusage = shutil.disk_usage\nshutil.disk_usage = lambda p: usage(p)._replace(free=2**40)"
FULL_DISK = [  # (id, argv builder, code run first, bytes left free, needles)
    ("extract-memory-maps", _disk_extract, "", 32 * 1024, ["needs 51.8 KiB, but only 32.0 KiB are free"]),
    ("extract-memory-maps-reserved", _disk_extract, _SKIP_FREE_CHECK, 32 * 1024, ["51.8 KiB free on the disk", "objects/extract", "full"]),
    ("detect-csv", _disk_detect_csv, "", 0, ["B free on the disk holding", "flags.csv", "full", "0 B free)"]),
    ("models-json", _disk_models_json, "", 0, ["models.json", "full", "B free on the disk"]),
    ("export-demo", _disk_export, "", 0, ["digits", "full"]),
]


@pytest.mark.parametrize("build, prelude, leave, needles", [c[1:] for c in FULL_DISK], ids=[c[0] for c in FULL_DISK])
def test_a_full_disk_loses_nothing(small_disk, tmp_path, build, prelude, leave, needles):
    argv = build(tmp_path, small_disk)
    (small_disk / "home").mkdir()
    _fill(small_disk, leave)
    done = _cfdebug(*argv, prelude=prelude)
    err = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("warning: no confident"))  # detect's own
    assert_one_error(done.returncode, err, str(small_disk), *needles)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "home"]  # no partial output
    assert_nothing_half_written(small_disk / "home")


READ_ONLY_DISK = [
    ("export-demo", _disk_export, ["digits", "read-only"]),
]


@pytest.mark.parametrize("build, needles", [c[1:] for c in READ_ONLY_DISK], ids=[c[0] for c in READ_ONLY_DISK])
def test_a_read_only_disk_loses_nothing(small_disk, tmp_path, build, needles):
    argv = build(tmp_path, small_disk)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    done = _cfdebug(*argv)
    assert_one_error(done.returncode, done.stderr, str(small_disk), *needles)
    assert list(small_disk.iterdir()) == []


_KILLED_MID_EXTRACTION = """
import os, signal
import cfdebug.extract as extract

def killed(model, layer, batches, n_items, out_dir, *args, **kwargs):
    (out_dir / "features.npy").write_bytes(b"half of it")
    os.kill(os.getpid(), signal.SIGKILL)

extract.stream_features = killed
"""


def _killed_extraction(t, home):
    done = _cfdebug(*_extract(t)[:1], "--workdir", str(home), "--device", "cpu", "--quiet", *_extract(t)[1:], prelude=_KILLED_MID_EXTRACTION)
    assert done.returncode == -9, done.stderr


def _crash_after_discarding(t, home):
    (home / "objects" / "extract" / ".bad-0123456789abcdef0123-deadbeef").mkdir(parents=True)


LEFT_BEHIND = [("sigkill-during-extraction", _killed_extraction), ("crash-while-discarding", _crash_after_discarding)]


@pytest.mark.parametrize("leave", [c[1] for c in LEFT_BEHIND], ids=[c[0] for c in LEFT_BEHIND])
def test_what_a_dead_writer_left_is_removed_when_the_store_opens(tmp_path, leave):
    from cfdebug.store import Store

    home = tmp_path / "home"
    leave(tmp_path, home)
    leftovers = [p for p in (home / "objects" / "extract").iterdir() if p.name.startswith((".tmp-", ".bad-"))]
    assert len(leftovers) == 1, leftovers
    Store(home)
    assert not leftovers[0].exists()
    assert_nothing_half_written(home)


def test_a_live_writers_temporary_folder_is_kept_when_a_store_opens(tmp_path):
    from cfdebug.store import Store

    store = Store(tmp_path / "home")
    with store.writer("extract", "0123456789abcdef0123", {}) as tmp:
        np.save(tmp / "x.npy", np.zeros(3))
        assert Store(tmp_path / "home").sweep() == []
        assert (tmp / "x.npy").is_file()
    assert store.exists("extract", "0123456789abcdef0123")
