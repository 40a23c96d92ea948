"""Datasets: Biased and Hard Digits, ImageFolder trees, CUB-200-2011, CIFAR batches, and their errors."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfdebug.config import DataConfig
from cfdebug.data import TorchSplit, carve_validation, export_imagefolder, load_data
from cfdebug.data.digits import (
    CLASS_COLOURS, CORNER_FREE, HARD_JITTER, SPLIT_FRACTIONS, SQUARE, build_bed, build_digits, build_hard_digits, digit_images,
    jitter_digits, stratified_split,
)
from cfdebug.data.formats import detect_format, load_cifar10c
from cfdebug.errors import CfdebugError

# ---------------------------------------------------------------- Biased Digits


@pytest.fixture(scope="module")
def digits():
    return build_digits(0.9, 0)


def _square_class(images: np.ndarray) -> np.ndarray:
    """The class whose colour the corner square has, per image ([N])."""
    square = images[:, SQUARE[0], SQUARE[1], :].reshape(len(images), -1, 3)  # [N, 36, 3]
    assert (square == square[:, :1]).all()  # one flat colour
    colour = square[:, 0].astype(int)  # [N, 3]
    dist = ((colour[:, None, :] - CLASS_COLOURS[None].astype(int)) ** 2).sum(-1)  # [N, 10]
    assert (dist.min(1) == 0).all()
    return dist.argmin(1)


def test_digits_split_sizes_and_stratification(digits):
    sizes = {name: len(labels) for name, (_, labels, _) in digits.items()}
    assert sum(sizes.values()) == 1797
    for name, frac in SPLIT_FRACTIONS.items():
        assert abs(sizes[name] - frac * 1797) <= 10, (name, sizes)
    all_labels = np.concatenate([labels for _, labels, _ in digits.values()])
    totals = np.bincount(all_labels, minlength=10)
    for name, (images, labels, source) in digits.items():
        assert images.shape == (len(labels), 32, 32, 3) and images.dtype == np.uint8
        counts = np.bincount(labels, minlength=10)
        # stratified: every class within one image of its share
        assert np.all(np.abs(counts - SPLIT_FRACTIONS[name] * totals) <= 1), (name, counts)
    sources = np.concatenate([s for _, _, s in digits.values()])
    assert len(np.unique(sources)) == 1797  # disjoint splits covering the set


def test_digits_deterministic_under_seed(digits):
    again = build_digits(0.9, 0)
    other = build_digits(0.9, 1)
    for name in digits:
        for a, b in zip(digits[name], again[name]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(digits["train"][2], other["train"][2])


def test_digits_shortcut_rates(digits):
    train_images, train_labels, _ = digits["train"]
    test_images, test_labels, _ = digits["test"]
    train_rate = (_square_class(train_images) == train_labels).mean()
    test_rate = (_square_class(test_images) == test_labels).mean()
    assert train_rate >= 0.85
    assert 0.05 <= test_rate <= 0.16


def test_digits_bias_zero_is_chance():
    clean = build_digits(0.0, 0)
    images, labels, _ = clean["train"]
    assert 0.05 <= (_square_class(images) == labels).mean() <= 0.16
    bundle = load_data(DataConfig(source="clean-digits"))
    imgs = bundle.splits["train"].images
    assert 0.05 <= (_square_class(imgs) == bundle.splits["train"].labels).mean() <= 0.16


def test_digits_bad_bias():
    with pytest.raises(CfdebugError, match="bias"):
        build_digits(1.5, 0)


def test_load_data_digits_bundle():
    bundle = load_data(DataConfig())
    assert bundle.format == "digits" and bundle.num_classes == 10
    assert bundle.input_size == 32
    x, y, i = bundle.torch_split("test")[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == bundle.splits["test"].labels[5] and i == 5
    assert bundle.fingerprint != load_data(DataConfig(seed=1)).fingerprint


def test_stratified_split_is_partition():
    labels = np.repeat(np.arange(3), 10)
    parts = stratified_split(labels, 0)
    allidx = np.sort(np.concatenate(list(parts.values())))
    np.testing.assert_array_equal(allidx, np.arange(30))


def test_export_imagefolder_roundtrip(tmp_path):
    out = tmp_path / "digits"
    counts = export_imagefolder(out, bias=0.9, seed=0)
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (out / split).iterdir()) == [str(d) for d in range(10)]
        assert len(list((out / split).glob("*/*.png"))) == counts[split]
    bundle = load_data(DataConfig(source=str(out)))
    assert bundle.format == "imagefolder"
    assert {k: len(v) for k, v in bundle.splits.items()} == counts
    assert bundle.classes == tuple(str(d) for d in range(10))
    # the exported pixels are the in-memory ones
    mem = load_data(DataConfig())
    first = bundle.splits["test"].load_image(0)
    j = mem.splits["test"].ids.index(bundle.splits["test"].ids[0].replace(".png", "").replace(os.sep, "/"))
    np.testing.assert_array_equal(first, mem.splits["test"].images[j])
    with pytest.raises(CfdebugError, match="empty"):
        export_imagefolder(out)


def test_export_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CfdebugError, match=str(tmp_path)):
        export_imagefolder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_export_onto_a_file_errors(tmp_path):
    target = tmp_path / "file.png"
    target.write_bytes(b"x")
    with pytest.raises(CfdebugError, match="is a file"):
        export_imagefolder(target)


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 50:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        export_imagefolder(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one
    (tmp_path / "empty").mkdir()
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        export_imagefolder(tmp_path / "empty")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and not any((tmp_path / "empty").iterdir())


# ---------------------------------------------------------------- ImageFolder


def _png(path: Path, value: int = 128, size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _tree(root: Path, classes=("cat", "dog"), per_class=5, splits=("train", "test")) -> Path:
    for split in splits:
        for c, cls in enumerate(classes):
            for k in range(per_class):
                _png(root / split / cls / f"{k}.png", value=40 * c + k)
    return root


def test_imagefolder_classes_and_carved_val(tmp_path):
    root = _tree(tmp_path / "ds", per_class=10)
    bundle = load_data(DataConfig(source=str(root), val_fraction=0.2))
    assert bundle.format == "imagefolder" and bundle.classes == ("cat", "dog")
    sizes = {k: len(v) for k, v in bundle.splits.items()}
    assert sizes == {"train": 16, "val": 4, "test": 20}
    for split in ("train", "val"):
        assert np.bincount(bundle.splits[split].labels).tolist() == ([8, 8] if split == "train" else [2, 2])
    assert not set(bundle.splits["train"].ids) & set(bundle.splits["val"].ids)
    assert all(i.startswith("train") for i in bundle.splits["val"].ids)
    assert bundle.input_size == 224  # ImageNet defaults for user folders
    again = load_data(DataConfig(source=str(root), val_fraction=0.2))
    assert again.splits["val"].ids == bundle.splits["val"].ids  # seeded
    x, y, _ = bundle.torch_split("val")[0]
    assert x.shape == (3, 224, 224)


def test_carved_val_is_never_empty(tmp_path):
    # 3 images per class and the default fraction 0.1: each class still gives one to val
    root = _tree(tmp_path / "ds", per_class=3)
    bundle = load_data(DataConfig(source=str(root)))
    assert len(bundle.splits["val"]) >= 1
    assert np.bincount(bundle.splits["train"].labels, minlength=2).min() >= 1


def test_carve_validation_bad_fraction(tmp_path):
    bundle = load_data(DataConfig(source=str(_tree(tmp_path / "ds"))))
    with pytest.raises(CfdebugError, match="val_fraction"):
        carve_validation(bundle.splits["train"], 1.5, 0)


def test_imagefolder_present_val_is_used(tmp_path):
    root = _tree(tmp_path / "ds", per_class=4, splits=("train", "test"))
    _png(root / "val" / "cat" / "v0.png")
    _png(root / "val" / "dog" / "v1.png")
    bundle = load_data(DataConfig(source=str(root)))
    assert len(bundle.splits["train"]) == 8
    assert sorted(bundle.splits["val"].ids) == [os.path.join("val", "cat", "v0.png"), os.path.join("val", "dog", "v1.png")]
    assert bundle.splits["val"].labels.tolist() == [0, 1]


def test_non_image_file_skipped_and_reported(tmp_path):
    root = _tree(tmp_path / "ds")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    _png(root / "train" / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")  # hidden folder: ignored
    bundle = load_data(DataConfig(source=str(root)))
    assert [Path(p).name for p in bundle.skipped] == ["notes.txt"]
    assert not any("notes" in i for s in bundle.splits.values() for i in s.ids)
    assert len(bundle.splits["train"]) + len(bundle.splits["val"]) == 10


def test_empty_class_folder_names_it(tmp_path):
    root = _tree(tmp_path / "ds")
    (root / "train" / "empty").mkdir()
    with pytest.raises(CfdebugError, match=str(root / "train" / "empty")):
        load_data(DataConfig(source=str(root)))


def test_missing_path_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CfdebugError, match="does not exist"):
        load_data(DataConfig(source=str(missing)))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CfdebugError, match="folder"):
        load_data(DataConfig(source=str(tmp_path / "file.txt")))


def test_missing_test_folder(tmp_path):
    root = _tree(tmp_path / "ds", splits=("train",))
    with pytest.raises(CfdebugError, match="test"):
        load_data(DataConfig(source=str(root)))


def test_unknown_class_in_test(tmp_path):
    root = _tree(tmp_path / "ds")
    _png(root / "test" / "horse" / "0.png")
    with pytest.raises(CfdebugError, match="horse"):
        load_data(DataConfig(source=str(root)))


def test_class_missing_from_test_is_allowed(tmp_path):
    root = _tree(tmp_path / "ds", classes=("a", "b", "c"))
    for p in (root / "test" / "c").iterdir():
        p.unlink()
    (root / "test" / "c").rmdir()
    bundle = load_data(DataConfig(source=str(root)))
    assert bundle.classes == ("a", "b", "c")
    assert set(bundle.splits["test"].labels.tolist()) == {0, 1}


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_unreadable_image_names_the_file(tmp_path, kind):
    root = _tree(tmp_path / "ds")
    bad = root / "test" / "dog" / "x.png"
    if kind == "truncated":
        _png(bad, size=64)
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("this is not a PNG")
    bundle = load_data(DataConfig(source=str(root), input_size=16))
    split = bundle.splits["test"]
    i = split.paths.index(str(bad))
    ds = TorchSplit(split, bundle.input_size, bundle.mean, bundle.std)
    ds[0]  # a good one reads fine
    with pytest.raises(CfdebugError, match="x.png") as err:
        ds[i]
    assert str(bad) in str(err.value)


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    root = _tree(tmp_path / "ds")
    first = load_data(DataConfig(source=str(root))).fingerprint
    assert load_data(DataConfig(source=str(root))).fingerprint == first
    target = root / "train" / "cat" / "0.png"
    _png(target, value=3, size=5)  # new content and size
    changed = load_data(DataConfig(source=str(root))).fingerprint
    assert changed != first
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # only the mtime
    assert load_data(DataConfig(source=str(root))).fingerprint != changed
    _png(root / "test" / "cat" / "extra.png")  # a new file
    assert load_data(DataConfig(source=str(root))).fingerprint not in (first, changed)


# ---------------------------------------------------------------- CUB-200-2011


def _cub(root: Path) -> Path:
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    rows, split_rows, label_rows = [], [], []
    image_id = 0
    for c, cls in enumerate(classes):
        for k in range(4):
            image_id += 1
            rel = f"{cls}/{cls.split('.')[1]}_{k:04d}.jpg"
            path = root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((6, 6, 3), 30 * image_id, np.uint8)).save(path)
            rows.append(f"{image_id} {rel}\n")
            split_rows.append(f"{image_id} {1 if k < 3 else 0}\n")
            label_rows.append(f"{image_id} {c + 1}\n")
    (root / "images.txt").write_text("".join(rows))
    (root / "train_test_split.txt").write_text("".join(split_rows))
    (root / "image_class_labels.txt").write_text("".join(label_rows))
    return root


def test_cub_layout(tmp_path):
    root = _cub(tmp_path / "CUB_200_2011")
    assert detect_format(root) == "cub"
    bundle = load_data(DataConfig(source=str(root), val_fraction=0.34))
    assert bundle.format == "cub"
    assert bundle.classes == ("001.Black_footed_Albatross", "002.Laysan_Albatross")
    assert len(bundle.splits["test"]) == 2
    assert bundle.splits["test"].labels.tolist() == [0, 1]
    assert all(i.endswith("_0003.jpg") for i in bundle.splits["test"].ids)
    assert len(bundle.splits["train"]) + len(bundle.splits["val"]) == 6
    assert len(bundle.splits["val"]) == 2
    for split in ("train", "val"):
        for i, label in zip(bundle.splits[split].ids, bundle.splits[split].labels):
            assert i.startswith(bundle.classes[label])
    x, y, _ = bundle.torch_split("test")[1]
    assert x.shape == (3, 224, 224) and y == 1


def test_cub_missing_image(tmp_path):
    root = _cub(tmp_path / "CUB")
    victim = next((root / "images").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(CfdebugError, match=victim.name):
        load_data(DataConfig(source=str(root)))


# ---------------------------------------------------------------- CIFAR batches


def _cifar_batch(n: int, n_classes: int, seed: int, label_key: bytes = b"labels") -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.permutation(np.arange(n) % n_classes)],  # every class once n >= n_classes
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def _dump(obj, path: Path, protocol: int = 2) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batches(tmp_path, protocol):
    batches = [_cifar_batch(10, 10, seed) for seed in range(3)]
    for k, batch in enumerate(batches[:2], start=1):
        _dump(batch, tmp_path / f"data_batch_{k}", protocol)
    _dump(batches[2], tmp_path / "test_batch", protocol)
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    _dump({b"label_names": names, b"num_vis": 3072}, tmp_path / "batches.meta", protocol)
    assert detect_format(tmp_path) == "cifar"
    bundle = load_data(DataConfig(source=str(tmp_path), val_fraction=0.25))
    assert bundle.format == "cifar" and bundle.classes[0] == "airplane" and bundle.num_classes == 10
    assert bundle.input_size == 32
    assert len(bundle.splits["train"]) + len(bundle.splits["val"]) == 20
    assert len(bundle.splits["test"]) == 10
    # pixel layout: row-major R plane, then G, then B
    test = bundle.splits["test"]
    np.testing.assert_array_equal(test.images[2, :, :, 1], batches[2][b"data"][2, 1024:2048].reshape(32, 32))
    assert test.labels.tolist() == batches[2][b"labels"]
    x, y, _ = bundle.torch_split("test")[0]
    assert x.shape == (3, 32, 32) and y == batches[2][b"labels"][0]


def test_cifar_batches_in_numeric_order_and_stray_copies_ignored(tmp_path):
    batches = [_cifar_batch(3, 10, seed) for seed in range(12)]
    for k in range(1, 12):  # data_batch_1 … data_batch_11: 10 sorts before 2 as text
        _dump(batches[k], tmp_path / f"data_batch_{k}")
    _dump(_cifar_batch(5, 10, 99), tmp_path / "data_batch_1.bak")
    _dump(batches[0], tmp_path / "test_batch")
    bundle = load_data(DataConfig(source=str(tmp_path), val_fraction=0.1))
    train_ids = bundle.splits["train"].ids + bundle.splits["val"].ids
    assert len(train_ids) == 33  # the .bak batch's 5 images are not there
    labels = dict(zip(bundle.splits["train"].ids, bundle.splits["train"].labels.tolist()))
    expected = [v for k in range(1, 12) for v in batches[k][b"labels"]]
    assert all(labels[f"train/{i:05d}"] == expected[i] for i in range(33) if f"train/{i:05d}" in labels)


def test_cifar_negative_label_refused(tmp_path):
    batch = _cifar_batch(4, 10, 0)
    batch[b"labels"][2] = -1
    _dump(batch, tmp_path / "data_batch_1")
    _dump(_cifar_batch(4, 10, 1), tmp_path / "test_batch")
    with pytest.raises(CfdebugError, match="labels >= 0, but found -1"):
        load_data(DataConfig(source=str(tmp_path)))


def test_decompression_bomb_is_refused_with_the_file_named(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    root = _tree(tmp_path / "ds")
    bomb = _png(root / "test" / "dog" / "huge.png", size=64)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 64×64 > 2 × 100 pixels: Pillow refuses it
    bundle = load_data(DataConfig(source=str(root), input_size=16))
    split = bundle.splits["test"]
    ds = TorchSplit(split, bundle.input_size, bundle.mean, bundle.std)
    with pytest.raises(CfdebugError, match="decompression bomb") as err:
        ds[split.paths.index(str(bomb))]
    assert "huge.png" in str(err.value)


def test_cifar100_layout(tmp_path):
    _dump(_cifar_batch(100, 100, 0, b"fine_labels"), tmp_path / "train")
    _dump(_cifar_batch(4, 100, 1, b"fine_labels"), tmp_path / "test")
    names = [f"class{i}".encode() for i in range(100)]
    _dump({b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}, tmp_path / "meta")
    assert detect_format(tmp_path) == "cifar"
    bundle = load_data(DataConfig(source=str(tmp_path)))
    assert bundle.num_classes == 100 and bundle.classes[7] == "class7"
    assert len(bundle.splits["test"]) == 4


class _Evil:
    """Unpickling this would create a file: the payload a refusing reader must never run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_cifar_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    data = tmp_path / "data"
    data.mkdir()
    batch = _cifar_batch(4, 10, 0)
    batch[b"labels"] = _Evil(marker)
    _dump(batch, data / "data_batch_1")
    _dump(_cifar_batch(4, 10, 1), data / "test_batch")
    with pytest.raises(CfdebugError, match="data_batch_1|Refusing"):
        load_data(DataConfig(source=str(data)))
    assert not marker.exists()
    # the payload is live: a plain unpickler would have created the file
    with open(data / "data_batch_1", "rb") as handle:
        pickle.load(handle, encoding="bytes")
    assert marker.exists()


def test_cifar_batch_not_a_dict(tmp_path):
    _dump([1, 2, 3], tmp_path / "data_batch_1")
    _dump(_cifar_batch(4, 10, 1), tmp_path / "test_batch")
    with pytest.raises(CfdebugError, match="data_batch_1"):
        load_data(DataConfig(source=str(tmp_path)))


def test_cifar_garbage_file(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"garbage, not a pickle")
    _dump(_cifar_batch(4, 10, 1), tmp_path / "test_batch")
    with pytest.raises(CfdebugError, match="data_batch_1"):
        load_data(DataConfig(source=str(tmp_path)))


# ---------------------------------------------------------------- format detection and options


def test_format_auto_detection_and_override(tmp_path):
    tree = _tree(tmp_path / "tree")
    assert detect_format(tree) == "imagefolder"
    assert load_data(DataConfig(source=str(tree), format="imagefolder")).format == "imagefolder"
    # an explicit --format wins over detection
    with pytest.raises(CfdebugError, match="images.txt"):
        load_data(DataConfig(source=str(tree), format="cub"))
    with pytest.raises(CfdebugError, match="data_batch_1|test"):
        load_data(DataConfig(source=str(tree), format="cifar"))
    # a layout that detection cannot place, read with --format
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "readme.md").write_text("hi")
    with pytest.raises(CfdebugError, match="--format") as err:
        load_data(DataConfig(source=str(odd)))
    assert "readme.md" in str(err.value)
    with pytest.raises(CfdebugError, match="`data.format`"):  # refused by DataConfig itself
        load_data(DataConfig(source=str(tree), format="bogus"))


def test_empty_folder_detection(tmp_path):
    with pytest.raises(CfdebugError, match="empty folder"):
        load_data(DataConfig(source=str(tmp_path)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_size=4), "input-size"),
        (dict(input_size=0), "input.size"),  # refused by DataConfig itself: `data.input_size`
        (dict(input_size=-32), "input.size"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
        (dict(std=(0.2, -1.0, 0.2)), "std"),
        (dict(mean=(0.5, float("nan"), 0.5)), "finite"),
        (dict(std=(0.2, float("inf"), 0.2)), "finite"),
    ],
)
def test_bad_transform_options(kwargs, match):
    with pytest.raises(CfdebugError, match=match):
        load_data(DataConfig(**kwargs))


def test_custom_transform_options(tmp_path):
    bundle = load_data(DataConfig(input_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    x, _, i = bundle.torch_split("train")[0]
    assert x.shape == (3, 16, 16)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    full = TorchSplit(bundle.splits["train"], 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[0][0]
    np.testing.assert_allclose(full.numpy(), bundle.splits["train"].images[0].transpose(2, 0, 1) / 255.0, atol=1e-6)


# ---------------------------------------------------------------- Hard Digits (no shortcut)


@pytest.fixture(scope="module")
def hard():
    return build_hard_digits(0)


def test_hard_digits_shapes_split_and_balance(hard, digits):
    for name, (images, labels, source) in hard.items():
        assert images.shape == (len(labels), 32, 32, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(source, digits[name][2])  # the biased set's split, image for image
        np.testing.assert_array_equal(labels, digits[name][1])
        counts = np.bincount(labels, minlength=10)
        assert counts.max() - counts.min() <= 0.1 * counts.mean() + 1, (name, counts)
    # not a plain copy: jittered, noisy, with a background
    assert not np.array_equal(hard["train"][0], digits["train"][0])
    assert hard["train"][0][:, 0, 0, :].std() > 10


def test_hard_digits_deterministic_under_seed(hard):
    again = build_hard_digits(0)
    for name in hard:
        for a, b in zip(hard[name], again[name]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(build_hard_digits(1)["train"][0], hard["train"][0])


def test_hard_digits_corner_carries_no_stroke():
    """Without background, contrast change or noise, every corner block is empty: no digit pixel
    reaches a corner, so nothing there can depend on the class."""
    images, _ = digit_images()
    strokes = jitter_digits(images, np.random.default_rng(2), replace(HARD_JITTER, background=(0.0, 0.0), contrast=(1.0, 1.0), noise=(0.0, 0.0)))
    assert strokes.max() > 200  # the digits are there
    assert strokes[:, CORNER_FREE == 0].max() == 0


def test_hard_digits_corner_statistics_do_not_predict_the_label(hard):
    """Per class, the corner square's mean and spread are within noise (one-way ANOVA), unlike
    Biased Digits, where the square's colour gives the class away."""
    from scipy.stats import f_oneway

    for name in ("train", "test"):
        images, labels, _ = hard[name]
        corner = images[:, SQUARE[0], SQUARE[1], :].reshape(len(images), -1).astype(float)  # [N, 108]
        for stat in (corner.mean(1), corner.std(1)):
            p = f_oneway(*(stat[labels == k] for k in range(10))).pvalue
            assert p > 0.01, (name, p)
    biased_images, biased_labels, _ = build_digits(0.9, 0)["train"]
    red = biased_images[:, SQUARE[0], SQUARE[1], 0].reshape(len(biased_images), -1).mean(1)
    assert f_oneway(*(red[biased_labels == k] for k in range(10))).pvalue < 1e-6  # the test can see a shortcut


def test_load_data_hard_digits():
    bundle = load_data(DataConfig(source="hard-digits"))
    assert bundle.name == "hard-digits" and bundle.format == "digits" and bundle.num_classes == 10
    assert {k: len(v) for k, v in bundle.splits.items()} == {"train": 1078, "val": 180, "test": 539}
    assert bundle.fingerprint not in (load_data(DataConfig()).fingerprint, load_data(DataConfig(source="clean-digits")).fingerprint)
    assert bundle.fingerprint != load_data(DataConfig(source="hard-digits", seed=1)).fingerprint
    with pytest.raises(CfdebugError, match="embedded dataset"):
        build_bed("easy-digits")


def test_export_hard_digits(tmp_path):
    out = tmp_path / "hard"
    counts = export_imagefolder(out, bed="hard-digits")
    assert counts == {"train": 1078, "val": 180, "test": 539}
    mem = load_data(DataConfig(source="hard-digits")).splits["test"]
    disk = load_data(DataConfig(source=str(out))).splits["test"]
    j = mem.ids.index(disk.ids[0].replace(".png", "").replace(os.sep, "/"))
    np.testing.assert_array_equal(disk.load_image(0), mem.images[j])


# ---------------------------------------------------------------- CIFAR-10-C files (formats.load_cifar10c)


@pytest.fixture()
def cifar10c_dir(tmp_path):
    """Fake CIFAR-10-C: 5 severities × 4 images of 8×8; pixel value = 10·severity + index."""
    per = 4
    values = np.array([10 * s + i for s in range(1, 6) for i in range(per)], dtype=np.uint8)
    fog = np.broadcast_to(values[:, None, None, None], (5 * per, 8, 8, 3)).copy()
    np.save(tmp_path / "fog.npy", fog)
    np.save(tmp_path / "labels.npy", np.tile(np.array([3, 1, 4, 1], np.uint8), 5))
    return tmp_path


def test_load_cifar10c_slices_one_severity(cifar10c_dir):
    for severity in range(1, 6):
        x, y = load_cifar10c(cifar10c_dir, "fog", severity)
        assert x.shape == (4, 8, 8, 3) and x.dtype == np.uint8
        np.testing.assert_array_equal(x[:, 0, 0, 0], 10 * severity + np.arange(4))
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, [3, 1, 4, 1])


def test_load_cifar10c_with_given_labels(cifar10c_dir):
    _, y = load_cifar10c(cifar10c_dir, "fog", 2, labels=np.array([9, 8, 7, 6]))  # one severity's worth
    np.testing.assert_array_equal(y, [9, 8, 7, 6])
    _, y = load_cifar10c(cifar10c_dir, "fog", 2, labels=np.arange(20))  # one per image in the file
    np.testing.assert_array_equal(y, [4, 5, 6, 7])


def test_load_cifar10c_length_mismatch(cifar10c_dir):
    with pytest.raises(CfdebugError, match=r"but got 7 labels for 20 images"):
        load_cifar10c(cifar10c_dir, "fog", 1, labels=np.arange(7))
    np.save(cifar10c_dir / "labels.npy", np.arange(19))
    with pytest.raises(CfdebugError, match=r"19 labels for 20 images"):
        load_cifar10c(cifar10c_dir, "fog", 1)


def test_load_cifar10c_missing_files(cifar10c_dir):
    with pytest.raises(CfdebugError, match=r"snow\.npy.*does not exist.*holds fog, labels"):
        load_cifar10c(cifar10c_dir, "snow", 1)
    with pytest.raises(CfdebugError, match="not a folder"):
        load_cifar10c(cifar10c_dir / "nope", "fog", 1)
    (cifar10c_dir / "labels.npy").unlink()
    with pytest.raises(CfdebugError, match=r"labels\.npy.*does not exist"):
        load_cifar10c(cifar10c_dir, "fog", 1)
    with pytest.raises(CfdebugError, match="`severity`"):
        load_cifar10c(cifar10c_dir, "fog", 6)
    with pytest.raises(CfdebugError, match="Did you mean 'fog'"):
        load_cifar10c(cifar10c_dir, "fogg", 1)


def test_load_cifar10c_bad_file(cifar10c_dir):
    np.save(cifar10c_dir / "snow.npy", np.zeros((7, 8, 8, 3), np.uint8))  # not 5 blocks
    with pytest.raises(CfdebugError, match="multiple of 5"):
        load_cifar10c(cifar10c_dir, "snow", 1)
    (cifar10c_dir / "frost.npy").write_bytes(b"not a npy file")
    with pytest.raises(CfdebugError, match="readable .npy"):
        load_cifar10c(cifar10c_dir, "frost", 1)
