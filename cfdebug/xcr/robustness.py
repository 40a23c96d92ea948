"""Paper B's Table 2: retrained models' calibration on the clean and the corrupted test split.

Corrupted sets are made from the test images as uint8 at the model's input size
(:func:`cfdebug.data.corruptions.corrupt`, CIFAR-10-C parameters), a chunk at a time with a
seed per chunk, so memory does not grow with the test split. With ``XCRConfig.cifar10c_dir``
the official CIFAR-10-C files are read instead (:func:`check_cifar10c` checks them before any
training). "Corrupt" numbers are the mean over every corruption × severity evaluated; each
number is the mean over seeds; the reliability bins are pooled over seeds (and corruptions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..config import XCRConfig
from ..data.corruptions import N_SEVERITIES, corrupt
from ..data.formats import load_cifar10c
from ..errors import CfdebugError
from ..metrics import CalibrationAccumulator
from ..runtime import Progress
from .calibration import score_models
from .images import CHUNK, test_images

__all__ = ["TABLE2_COLUMNS", "IMAGE_FIELDS", "check_cifar10c", "corrupted_sets", "evaluate_models", "table2_results", "per_image_arrays"]

#: The per-image terms kept for paired verdicts (:func:`per_image_arrays`).
IMAGE_FIELDS = ("prediction", "correct", "confidence", "nll", "brier")

TABLE2_COLUMNS = ("method", "clean_acc", "corrupt_acc", "clean_ece", "corrupt_ece", "clean_nll", "corrupt_nll", "clean_brier", "corrupt_brier")
METRICS = ("accuracy", "ece", "nll", "brier")
_SHORT = dict(zip(METRICS, ("acc", "ece", "nll", "brier")))  # metric → Table 2 column suffix


def check_cifar10c(root: Path, names: Sequence[str], n_test: int) -> None:
    """Fail before any training when a CIFAR-10-C file is missing or does not fit the test split.

    Only the ``.npy`` headers are read (memory-mapped); :func:`load_cifar10c` checks the rest.
    """
    if not root.is_dir():
        raise CfdebugError(f"Expected `cifar10c_dir` to be the CIFAR-10-C folder, but {str(root)!r} is not a folder.")
    for name in names:
        path = root / f"{name}.npy"
        if not path.is_file():
            raise CfdebugError(f"Expected the CIFAR-10-C file {path}, but it does not exist. Check `cifar10c_dir` or drop {name!r} from `corruptions`.")
        try:
            total = int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        except (OSError, ValueError, IndexError) as exc:
            raise CfdebugError(f"Expected {path} to be a readable .npy file of CIFAR-10-C images, but reading it failed ({exc}).") from None
        if total != N_SEVERITIES * n_test:
            raise CfdebugError(
                f"Expected {path} to hold {N_SEVERITIES} × {n_test} images (one block per severity for the {n_test} labelled test images of "
                f"this workspace), but it holds {total}. CIFAR-10-C files go with the CIFAR-10 test split (10,000 images); "
                "use the matching dataset, or the generated corruptions (no `cifar10c_dir`)."
            )


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(chunk)]).generate_state(1)[0])


def _cifar10c_chunks(ws, config: XCRConfig, name: str, severity: int, index: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    full_labels = np.asarray(ws.data.splits["test"].labels)
    c_images, c_labels = load_cifar10c(config.cifar10c_dir, name, severity, labels=full_labels)
    if c_labels.max(initial=0) >= ws.data.num_classes:
        raise CfdebugError(
            f"Expected CIFAR-10-C labels in 0..{ws.data.num_classes - 1} for this workspace's "
            f"{ws.data.num_classes} classes, but got {int(c_labels.max())}. Use CIFAR-10-C with a CIFAR-10 model."
        )
    c_images, c_labels = c_images[index], c_labels[index]
    return [(c_images[s : s + CHUNK], c_labels[s : s + CHUNK]) for s in range(0, len(c_images), CHUNK)]


def corrupted_sets(ws, config: XCRConfig, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Iterator[tuple[str, int, object]]:
    """Yield ``(name, severity, chunks)`` per corruption × severity of ``config``.

    ``images`` ``[N, S, S, 3]`` uint8, ``labels`` ``[N]`` and ``index`` ``[N]`` (positions in the
    test split) come from :func:`~cfdebug.xcr.images.test_images`. ``chunks`` is an iterable of
    ``(images uint8, labels)``, generated lazily unless read from CIFAR-10-C files.
    """
    for name in config.corruptions:
        for severity in config.severities:
            if config.cifar10c_dir is not None:
                chunks = _cifar10c_chunks(ws, config, name, severity, index)
            else:
                chunks = (
                    (corrupt(images[s : s + CHUNK], name, severity, _chunk_seed(config.corruption_seed, s // CHUNK)), labels[s : s + CHUNK])
                    for s in range(0, len(images), CHUNK)
                )
            yield name, severity, chunks


def evaluate_models(
    ws,
    config: XCRConfig,
    models: dict[str, list],
    temperatures: dict[str, list[float]],
    progress: Progress | None = None,
    check: Callable[[], None] | None = None,
) -> dict:
    """Score every retrained model, without and with its temperature, on the clean test split
    and on each corruption × severity (a subset of at most ``config.max_corrupt_images``).

    Args:
        ws: the workspace (test split, input size, mean/std, device).
        config: the :class:`XCRConfig` (corruptions, severities, seeds, bins).
        models, temperatures: ``{method: [per seed]}`` as from the retraining.
        progress: ``progress(fraction, message)`` after each corrupted set.
        check: called before each corrupted set (raises to cancel).

    Returns:
        ``{"clean": {(variant, s): CalibrationAccumulator}, "corrupted": {(name, severity):
        {(variant, s): CalibrationAccumulator}}, "n_test", "n_corrupt"}``; the accumulators keep
        each image's terms (:func:`per_image_arrays`).
    """
    clean_images, clean_labels, _ = test_images(ws)
    chunks = [(clean_images[s : s + CHUNK], clean_labels[s : s + CHUNK]) for s in range(0, len(clean_images), CHUNK)]
    clean = score_models(models, temperatures, chunks, ws.data, ws.device, config.n_bins, keep_images=True)
    del clean_images, chunks
    c_images, c_labels, c_index = test_images(ws, config.max_corrupt_images, config.corruption_seed)
    n_sets = len(config.corruptions) * len(config.severities)
    corrupted = {}
    for j, (name, severity, chunks) in enumerate(corrupted_sets(ws, config, c_images, c_labels, c_index)):
        if check is not None:
            check()
        corrupted[(name, severity)] = score_models(models, temperatures, chunks, ws.data, ws.device, config.n_bins, keep_images=True)
        if progress is not None:
            progress((j + 1) / max(n_sets, 1), f"evaluated {name} severity {severity} ({j + 1}/{n_sets})")
    return {"clean": clean, "corrupted": corrupted, "n_test": int(len(clean_labels)), "n_corrupt": int(len(c_labels)) if n_sets else 0}


def _method_rows(method: str, seeds: Sequence[int], clean: dict, corrupted: dict) -> list[dict]:
    """Table 2 per seed for one variant: clean metrics, and their mean over the corrupted sets."""
    rows = []
    for s, seed in enumerate(seeds):
        row = {"method": method, "seed": int(seed)}
        for metric in METRICS:
            row[f"clean_{_SHORT[metric]}"] = clean[(method, s)][metric]
            values = [scores[(method, s)][metric] for scores in corrupted.values()]
            row[f"corrupt_{_SHORT[metric]}"] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows


def _pooled_bins(accumulators: list[CalibrationAccumulator], n_bins: int) -> dict:
    pool = CalibrationAccumulator(n_bins)
    for acc in accumulators:
        pool.merge(acc)
    return pool.compute()["bins"]


def table2_results(config: XCRConfig, methods: Sequence[str], scores: dict, temperatures: dict[str, list[float]]) -> dict:
    """Table 2 and its detail from :func:`evaluate_models`' ``scores``.

    Returns:
        ``{"table2", "per_corruption", "per_seed", "reliability"}`` (see
        :func:`~cfdebug.xcr.report.run_xcr_report`): rows per variant (``method`` and
        ``method+TS`` for each of ``methods``), means over seeds.
    """
    n_seeds = len(config.seeds)
    clean = {key: acc.compute() for key, acc in scores["clean"].items()}
    corrupted = {c: {key: acc.compute() for key, acc in accs.items()} for c, accs in scores["corrupted"].items()}
    per_seed, table2, per_corruption = [], [], []
    reliability = {"clean": {}, "corrupt": {}}
    for method in [m + ts for m in methods for ts in ("", "+TS")]:
        seed_rows = _method_rows(method, config.seeds, clean, corrupted)
        per_seed += seed_rows
        mean_row = {"method": method}
        for col in TABLE2_COLUMNS[1:]:
            values = [r[col] for r in seed_rows if r[col] is not None]
            mean_row[col] = float(np.mean(values)) if values else None
        mean_row["n_seeds"] = n_seeds
        mean_row["temperature"] = float(np.mean(temperatures[method.removesuffix("+TS")])) if method.endswith("+TS") else 1.0
        table2.append(mean_row)
        reliability["clean"][method] = _pooled_bins([scores["clean"][(method, s)] for s in range(n_seeds)], config.n_bins)
        if corrupted:
            reliability["corrupt"][method] = _pooled_bins(
                [accs[(method, s)] for s in range(n_seeds) for accs in scores["corrupted"].values()], config.n_bins
            )
        for (name, severity), by_key in corrupted.items():
            row = {"method": method, "corruption": name, "severity": int(severity)}
            for metric in METRICS:
                row[metric] = float(np.mean([by_key[(method, s)][metric] for s in range(n_seeds)]))
            per_corruption.append(row)
    return {"table2": table2, "per_corruption": per_corruption, "per_seed": per_seed, "reliability": reliability}


def per_image_arrays(scores: dict, variants: Sequence[str], n_seeds: int) -> tuple[dict[str, np.ndarray], list[list]]:
    """Every variant's per-image terms from :func:`evaluate_models`' ``scores``, for paired verdicts.

    Returns ``(arrays, sets)``: ``arrays["clean_<field>"]`` ``[V, S, N]`` and
    ``arrays["corrupt_<field>"]`` ``[V, S, G, Nc]`` (variant × seed × corrupted set × image;
    ``G = 0`` without corruptions) for each of :data:`IMAGE_FIELDS`, and ``sets`` the ``[name,
    severity]`` of each ``G`` index. Variant ``v`` is ``variants[v]``.
    """
    sets = [list(key) for key in scores["corrupted"]]
    arrays = {}
    for field in IMAGE_FIELDS:
        arrays[f"clean_{field}"] = np.stack([[scores["clean"][(v, s)].images()[field] for s in range(n_seeds)] for v in variants])
        per_set = [[[accs[(v, s)].images()[field] for accs in scores["corrupted"].values()] for s in range(n_seeds)] for v in variants]
        n_c = int(scores.get("n_corrupt") or 0)
        arrays[f"corrupt_{field}"] = np.asarray(per_set, dtype=np.float64).reshape(len(variants), n_seeds, len(sets), n_c)
    return arrays, sets
