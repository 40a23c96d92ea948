"""Readers for the dataset layouts users bring: ImageFolder trees, CUB-200-2011, CIFAR batches,
and the official CIFAR-10-C ``.npy`` files (:func:`load_cifar10c`, for XCR's Table 2).

Each reader validates the layout and returns class names and splits; nothing is downloaded.
Files with an extension that is not an image's are skipped and reported (``skipped``); a file
with an image extension that cannot be read fails when it is read, naming the file.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

from ..config import CORRUPTIONS, N_SEVERITIES
from ..errors import CfdebugError
from .dataset import IMAGE_EXTENSIONS, Split

IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


def detect_format(root: Path) -> str:
    """Guess the layout of ``root``; raise with what was found when no layout matches."""
    if (root / "images.txt").is_file() and (root / "train_test_split.txt").is_file():
        return "cub"
    if (root / "data_batch_1").is_file() or ((root / "train").is_file() and (root / "meta").is_file()):
        return "cifar"
    if (root / "train").is_dir():
        return "imagefolder"
    found = sorted(p.name for p in root.iterdir())[:10]
    raise CfdebugError(
        f"Cannot tell the dataset layout of {root}. Expected an ImageFolder tree (train/<class>/…, "
        "test/<class>/…), a CUB-200-2011 folder (images.txt, train_test_split.txt, "
        "image_class_labels.txt, classes.txt, images/) or CIFAR python batches (data_batch_1…, "
        f"test_batch); found {found or 'an empty folder'}. Pass `--format` if the layout is one of these."
    )


def tree_fingerprint(root: Path, files) -> str:
    """Hash of relative paths, sizes and modification times: changes when any file changes."""
    digest = hashlib.sha256()
    for path in files:
        try:
            stat = Path(path).stat()
        except OSError as exc:
            raise CfdebugError(
                f"Expected to read the dataset file {display_path(path)}, but {exc.strerror or exc}. "
                "Was the dataset changed while loading? Fix or remove the file, then run again."
            ) from None
        # surrogateescape: a path is hashed as its bytes on disk, whatever its encoding
        digest.update(f"{Path(path).relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


def display_path(path) -> str:
    """``path`` as printable text: bytes that are not UTF-8 shown as ``\\xNN`` escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_utf8(name: str) -> bool:
    """Whether ``name`` (decoded from the disk with surrogateescape) is not valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _skip_reason(path: Path, folder: Path) -> str | None:
    """Why an image-named file under the class ``folder`` cannot be used (a dangling or looping
    link, a name or subfolder name that is not UTF-8, so ids, JSON and CSV outputs could not
    hold it), or ``None``."""
    if _not_utf8(str(path.relative_to(folder))):
        return "name is not valid UTF-8; rename it"
    if not path.is_file():  # follows links: False for a dangling link or a link loop
        return "dangling or self-referencing symlink" if path.is_symlink() else "not a regular file"
    return None


def _scan_class_folder(folder: Path, skipped: list[str]) -> list[Path]:
    images = []
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)  # .ipynb_checkpoints/…
        if path.is_dir() or path.name in IGNORED_NAMES or hidden:
            continue
        reason = _skip_reason(path, folder)
        if reason is not None:
            skipped.append(f"{display_path(path)} ({reason})")
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            skipped.append(str(path))
    return images


def _class_folders(split_dir: Path, skipped: list[str]) -> list[str]:
    """The class folder names in ``split_dir``, sorted; hidden folders are left out, and a folder
    whose name is not UTF-8 (no class name, id or CSV cell could hold it) is skipped and reported."""
    names = []
    for path in split_dir.iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        if _not_utf8(path.name):
            skipped.append(f"{display_path(path)}/ (class folder name is not valid UTF-8; rename it)")
        else:
            names.append(path.name)
    return sorted(names)


def read_imagefolder(root: Path) -> tuple[tuple[str, ...], dict[str, Split], list[Path], list[str]]:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (optional ``root/val/<class>/*``)."""
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise CfdebugError(
                f"Expected an ImageFolder tree with {root / required}/<class>/<image> folders, "
                f"but {root / required} does not exist. Create train/ and test/ (val/ is optional)."
            )
    skipped: list[str] = []
    classes = tuple(_class_folders(root / "train", skipped))
    if not classes:
        raise CfdebugError(f"Expected class folders in {root / 'train'}, but found none. Put each class's images in train/<class>/.")
    splits, files = {}, []
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        present = classes if split == "train" else _class_folders(root / split, skipped)
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise CfdebugError(
                f"{root / split} has class folders that train/ lacks: {unknown}. Every class needs training images; "
                "add them to train/ or remove these folders."
            )
        ids, labels, paths = [], [], []
        for label, cls in enumerate(classes):
            folder = root / split / cls
            if not folder.is_dir():
                if split == "train":
                    raise CfdebugError(f"Class folder {folder} is missing.")
                continue
            images = _scan_class_folder(folder, skipped)
            if not images:
                raise CfdebugError(
                    f"Class folder {folder} has no images (expected files ending in {', '.join(IMAGE_EXTENSIONS[:4])}, …). "
                    "Add images or remove the folder."
                )
            for path in images:
                ids.append(str(path.relative_to(root)))
                labels.append(label)
                paths.append(str(path))
        if not ids:
            raise CfdebugError(f"{root / split} has no images. Put images in {root / split}/<class>/.")
        splits[split] = Split(split, tuple(ids), np.asarray(labels, dtype=np.int64), paths=tuple(paths))
        files.extend(Path(p) for p in paths)
    return classes, splits, files, skipped


def _read_table(path: Path, columns: int) -> list[list[str]]:
    if not path.is_file():
        raise CfdebugError(f"Expected the CUB-200-2011 file {path}, but it does not exist. Point `--data` at the CUB_200_2011 folder.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise CfdebugError(f"{path}, line {number}: expected {columns} columns, but got {line!r}.")
        rows.append(parts)
    return rows


def _table_int(text: str, path: Path, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CfdebugError(f"{path}: expected the {what} to be an integer, but got {text.strip()!r}. Fix that line of the file.") from None


def read_cub(root: Path) -> tuple[tuple[str, ...], dict[str, Split], list[Path], list[str]]:
    """The CUB-200-2011 archive layout: train/test from ``train_test_split.txt`` (1 = train)."""
    images = dict(_read_table(root / "images.txt", 2))
    split_of = dict(_read_table(root / "train_test_split.txt", 2))
    label_of = dict(_read_table(root / "image_class_labels.txt", 2))
    class_rows = _read_table(root / "classes.txt", 2)
    class_ids = [_table_int(i, root / "classes.txt", "class id") for i, _ in class_rows]
    classes = tuple(name for _, name in class_rows)
    index_of = {cid: k for k, cid in enumerate(class_ids)}
    parts = {"train": ([], [], []), "test": ([], [], [])}
    files = []
    for image_id, rel in images.items():
        if image_id not in split_of or image_id not in label_of:
            raise CfdebugError(f"Image id {image_id} ({rel}) is missing from train_test_split.txt or image_class_labels.txt in {root}.")
        cls = _table_int(label_of[image_id], root / "image_class_labels.txt", f"class id of image {image_id}")
        if cls not in index_of:
            raise CfdebugError(f"Image {rel} has class id {cls}, which classes.txt does not list.")
        path = root / "images" / rel
        if not path.is_file():
            raise CfdebugError(f"images.txt lists {rel}, but {path} does not exist.")
        ids, labels, paths = parts["train" if split_of[image_id].strip() == "1" else "test"]
        ids.append(rel)
        labels.append(index_of[cls])
        paths.append(str(path))
        files.append(path)
    splits = {}
    for name, (ids, labels, paths) in parts.items():
        if not ids:
            raise CfdebugError(f"train_test_split.txt in {root} puts no image in the {name} split.")
        splits[name] = Split(name, tuple(ids), np.asarray(labels, dtype=np.int64), paths=tuple(paths))
    return classes, splits, files, []


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts, lists, bytes and NumPy arrays) and refuses anything else.

    A pickle can name any callable; allowing only NumPy's array reconstruction means a
    tampered batch file cannot run code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 pickles of arrays: protocol 5 rebuilds from a buffer, protocol 2 encodes bytes.
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise CfdebugError(f"Refusing to unpickle {module}.{name} from a CIFAR batch: only NumPy arrays are allowed.")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> dict:
    if not path.is_file():
        raise CfdebugError(f"Expected the CIFAR batch file {path}, but it does not exist.")
    try:
        with open(path, "rb") as handle:
            batch = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except CfdebugError:
        raise
    except Exception as exc:
        raise CfdebugError(f"Cannot read CIFAR batch {path}: {exc}. Is it a CIFAR python batch file?") from exc
    if not isinstance(batch, dict):
        raise CfdebugError(f"Expected CIFAR batch {path} to hold a dict (data, labels), but it holds a {type(batch).__name__}.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_arrays(batch: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    key = "labels" if "labels" in batch else "fine_labels"
    if "data" not in batch or key not in batch:
        raise CfdebugError(f"CIFAR batch {path} lacks `data` or labels (found keys {sorted(batch)}).")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[key], dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise CfdebugError(f"CIFAR batch {path}: expected class labels >= 0, but found {int(labels.min())}.")
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise CfdebugError(f"CIFAR batch {path}: expected data [N, 3072] and N labels, but got data {data.shape} and {len(labels)} labels.")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels  # [N, 32, 32, 3]


def read_cifar(root: Path) -> tuple[tuple[str, ...], dict[str, Split], list[Path], list[str]]:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``, ``test``, ``meta``)."""
    if (root / "data_batch_1").is_file():
        # data_batch_1 … data_batch_5 by number; stray copies (data_batch_1.bak) are not batches.
        train_files = sorted((p for p in root.glob("data_batch_*") if p.name[len("data_batch_"):].isdigit()), key=lambda p: int(p.name[len("data_batch_"):]))
        test_files = [root / "test_batch"]
        meta_file, names_key = root / "batches.meta", "label_names"
    else:
        train_files, test_files = [root / "train"], [root / "test"]
        meta_file, names_key = root / "meta", "fine_label_names"
    splits, files = {}, []
    for name, paths in (("train", train_files), ("test", test_files)):
        arrays = [_cifar_arrays(_load_cifar_batch(p), p) for p in paths]
        images = np.concatenate([a for a, _ in arrays])
        labels = np.concatenate([b for _, b in arrays])
        ids = tuple(f"{name}/{i:05d}" for i in range(len(labels)))
        splits[name] = Split(name, ids, labels, images=images)
        files.extend(paths)
    n_classes = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
    if meta_file.is_file():
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _load_cifar_batch(meta_file).get(names_key, [])]
        files.append(meta_file)
    else:
        names = []
    classes = tuple(names) if len(names) >= n_classes else tuple(str(i) for i in range(n_classes))
    _check_cifar_classes(root, classes, splits)
    return classes, splits, files, []


# --------------------------------------------------------------------------------------------
# CIFAR-10-C (Hendrycks & Dietterich 2019): one .npy per corruption, severities 1..5 stacked
# --------------------------------------------------------------------------------------------

# The official CIFAR-10-C release also ships these four "extra" corruptions; they can be loaded
# from disk but are not generated (cfdebug.data.corruptions: not part of the 15-corruption benchmark).
_CIFAR10C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
_CIFAR10C_URL = "https://zenodo.org/record/2535967"


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        # memory-mapped: a CIFAR-10-C file is 150 MB and only a fifth of it is needed
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CfdebugError(
            f"Expected {path} to be a readable .npy file of {what}, but reading it failed ({exc}). "
            f"Download CIFAR-10-C again from {_CIFAR10C_URL}."
        ) from None


def load_cifar10c(
    directory, name: str, severity: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one corruption at one severity from the official CIFAR-10-C ``.npy`` files.

    ``directory/<name>.npy`` holds ``[5·M, 32, 32, 3]`` uint8: severities 1..5 stacked, ``M``
    (10,000 in the release) images each; ``directory/labels.npy`` holds the ``[5·M]`` labels.

    Args:
        directory: the unpacked ``CIFAR-10-C`` folder.
        name: one of :data:`CORRUPTIONS` (or an extra official one: speckle_noise,
            gaussian_blur, spatter, saturate).
        severity: integer in 1..5.
        labels: optional integer labels used instead of ``labels.npy``: either ``[5·M]`` (one
            per image in the file) or ``[M]`` (one severity, e.g. the CIFAR-10 test labels).

    Returns:
        ``(images, labels)``: ``[M, H, W, 3]`` uint8 in [0, 255] and ``[M]`` int64, new arrays.

    Raises:
        CfdebugError: unknown name, bad severity, missing folder or file, unreadable or
            wrongly shaped file, or labels whose length does not fit the images.
    """
    from .corruptions import check_corruption_name, check_severity  # the generator's catalogue (imports OpenCV)

    name = check_corruption_name(name, CORRUPTIONS + _CIFAR10C_EXTRA)
    severity = check_severity(severity)
    root = Path(directory)
    if not root.is_dir():
        raise CfdebugError(
            f"Expected `directory` to be the CIFAR-10-C folder, but {str(root)!r} is not a folder. "
            f"Download and unpack CIFAR-10-C from {_CIFAR10C_URL} and pass the folder that holds "
            "<corruption>.npy and labels.npy."
        )
    path = root / f"{name}.npy"
    if not path.is_file():
        present = sorted(p.stem for p in root.glob("*.npy"))
        listing = ", ".join(present) if present else "no .npy files"
        raise CfdebugError(
            f"Expected the CIFAR-10-C file {path}, but it does not exist ({root} holds {listing}). "
            f"Check the folder, or download CIFAR-10-C from {_CIFAR10C_URL}."
        )
    images = _load_npy(path, "CIFAR-10-C images")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise CfdebugError(
            f"Expected {path} to hold uint8 images of shape [N, H, W, 3], but got "
            f"{images.dtype} of shape {list(images.shape)}. Use the official CIFAR-10-C files."
        )
    total = len(images)
    if total == 0 or total % N_SEVERITIES:
        raise CfdebugError(
            f"Expected {path} to hold {N_SEVERITIES} equal blocks of images (one per severity), "
            f"but it holds {total} images, not a positive multiple of {N_SEVERITIES}. "
            f"Download CIFAR-10-C again from {_CIFAR10C_URL}."
        )
    per_severity = total // N_SEVERITIES

    if labels is None:
        labels_path = root / "labels.npy"
        if not labels_path.is_file():
            raise CfdebugError(
                f"Expected the CIFAR-10-C labels at {labels_path}, but the file does not exist. "
                "Put labels.npy from the CIFAR-10-C download there, or pass `labels=` "
                "(e.g. the CIFAR-10 test labels)."
            )
        labels = _load_npy(labels_path, "CIFAR-10-C labels")
        source = str(labels_path)
    else:
        source = "`labels`"
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise CfdebugError(
            f"Expected the labels in {source} to be a 1-D integer array, but got {labels.dtype} "
            f"of shape {list(labels.shape)}. Pass one integer class index per image."
        )

    block = slice((severity - 1) * per_severity, severity * per_severity)
    if len(labels) == total:
        labels = labels[block]
    elif len(labels) != per_severity:
        raise CfdebugError(
            f"Expected the labels in {source} to have {total} entries (one per image in {path.name}) "
            f"or {per_severity} (one severity), but got {len(labels)} labels for {total} images. "
            "Use the labels.npy shipped with the same CIFAR-10-C download."
        )
    return np.array(images[block]), np.array(labels, dtype=np.int64)


def _check_cifar_classes(root: Path, classes: tuple[str, ...], splits: dict[str, Split]) -> None:
    """Refuse classes without training images (a test label that train lacks, a gap in the
    labels, a name in the meta file that no image has), as an ImageFolder tree's train/ does."""
    trained = np.bincount(splits["train"].labels, minlength=len(classes))
    empty = np.flatnonzero(trained == 0)
    if empty.size:
        tested = int(np.isin(splits["test"].labels, empty).sum())
        names = ", ".join(f"{classes[k]} (label {k})" for k in empty[:10]) + (f" and {empty.size - 10} more" if empty.size > 10 else "")
        raise CfdebugError(
            f"Expected training images of every class in the CIFAR batches in {root}, but the train batches hold "
            f"none of {names}" + (f"; the test batch holds {tested} image(s) of them" if tested else "")
            + ". Every class needs training images: add them, or use batches (and a meta file) of the classes you train on."
        )
