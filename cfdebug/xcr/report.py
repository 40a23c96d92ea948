"""The XCR report: paper B's Table 1 (explanations) and Table 2 (calibration and robustness).

* **Table 1** (:func:`explanation_table`): for each ``k`` and ``β``, a selector trained against
  the true labels (XCR) and one imitating the black box (VIBI), plus random k-hot masks (one row
  per ``k``; β does not apply). Columns: ``accuracy`` (the approximator on ``T(x)`` of the test
  split, the paper's "Accuracy"; for random masks, which have no approximator, the black box on
  ``T(x)``; ``accuracy_of`` says which), ``masked_acc`` (the black box on ``T(x)``, every row),
  and the black box's ``fidelity``, ``avg_drop``, ``avg_inc``, ``sufficiency`` on the hard top-k
  ``T(x)`` (:func:`cfdebug.metrics.explanation_metrics`, fractions, not percent).
* **Table 2** (:func:`run_xcr_report`): vanilla and XCR retraining (identical schedule and
  seeds), each without and with temperature scaling fitted on the validation split
  (``+TS``), evaluated on the clean test split and on its corrupted copies: accuracy, ECE
  (15 bins), NLL and Brier (``[0, 2]``). "Corrupt" is the mean over every corruption ×
  severity evaluated; every number is the mean over seeds (``per_seed`` keeps each seed).

Corrupted sets are made from the test images as uint8 at the model's input size
(:func:`cfdebug.data.corruptions.corrupt`, CIFAR-10-C parameters), then normalised with the
workspace's mean/std, a chunk at a time, so memory does not grow with the test split. With
``XCRConfig.cifar10c_dir`` the official CIFAR-10-C files are read instead.

The whole report is cached in the workspace store (``xcr-report/<key>``, key = workspace
inputs + ``XCRConfig``), so a second call with the same inputs returns at once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..config import config_dict
from ..data.corruptions import MIN_IMAGE_SIZE, N_SEVERITIES, corrupt, load_cifar10c
from ..errors import CfdebugError
from ..runtime import Progress, scaled_progress
from ..metrics import (
    apply_temperature,
    brier_score,
    expected_calibration_error,
    explanation_metrics,
    negative_log_likelihood,
    reliability_bins,
)
from ..store import jsonable, stable_hash
from .retrain import XCRConfig, counterfactual_retrain, fit_val_temperature, training_masks, vanilla_retrain, xcr_config_from_dict
from .selector import (
    SelectorConfig,
    approximator_accuracy,
    check_k,
    compute_masks,
    masked_probabilities,
    num_patches,
    random_masks,
    selector_masks,
    trained_selector,
)

__all__ = [
    "TABLE1_MODES",
    "TABLE1_COLUMNS",
    "TABLE2_COLUMNS",
    "REPORT_KIND",
    "test_images",
    "normalise_images",
    "predict_images",
    "calibration_metrics",
    "evaluate_calibration",
    "explanation_table",
    "run_xcr_report",
    "xcr_run_from_config",
    "bench_xcr",
    "explanation_images",
    "format_table1",
    "format_table2",
    "format_bench",
    "print_table1",
    "print_table2",
]


TABLE1_MODES = ("XCR", "VIBI", "random")
TABLE1_COLUMNS = ("k", "beta", "mode", "accuracy", "avg_drop", "avg_inc", "fidelity", "sufficiency")
TABLE2_COLUMNS = ("method", "clean_acc", "corrupt_acc", "clean_ece", "corrupt_ece", "clean_nll", "corrupt_nll", "clean_brier", "corrupt_brier")
METRICS = ("accuracy", "ece", "nll", "brier")
REPORT_KIND = "xcr-report"
REPORT_FORMAT = "xcr-report-v1"
_CHUNK = 1024  # images corrupted and scored at once

# Stage boundaries of the progress fraction: Table 1, retraining, evaluation.
_STAGES = {"table1": (0.0, 0.35), "retrain": (0.35, 0.85), "evaluate": (0.85, 1.0)}


# --------------------------------------------------------------------------------------------
# Images and calibration metrics
# --------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    # Bilinear through PIL, exactly as TorchSplit resizes, so clean and corrupted inputs agree.
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _load_uint8(split, indices: np.ndarray, size: int) -> np.ndarray:
    """``[n, size, size, 3]`` uint8 images of ``split`` at ``indices``."""
    if split.images is not None and split.images.shape[1:3] == (size, size):
        return np.asarray(split.images[indices])
    out = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    for j, i in enumerate(indices):
        out[j] = _resize(np.asarray(split.load_image(int(i)), dtype=np.uint8), size)
    return out


def test_images(ws, max_images: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test split as ``(images [N, S, S, 3] uint8, labels [N] int64, indices [N] int64)``.

    ``S`` is the model's input size. With ``max_images`` a seeded random subset (sorted) of at
    most that many images is returned. In-memory datasets (digits, CIFAR batches) are sliced;
    image files are decoded and resized once into a memory-mapped array in the workspace store
    (``xcr-test-images/<key>``), so 75 corrupted copies do not decode the files 75 times and
    the split never has to fit in memory.
    """
    split = ws.data.splits["test"]
    index = np.arange(len(split))
    if max_images is not None and max_images < len(index):
        index = np.sort(np.random.default_rng(seed).choice(index, size=max_images, replace=False))
    labels = np.asarray(split.labels)[index].astype(np.int64)
    size = ws.data.input_size
    if split.images is not None and split.images.shape[1:3] == (size, size):
        return np.asarray(split.images[index]), labels, index
    kind, key = "xcr-test-images", stable_hash("xcr-test-images", ws.key_parts, size, index.tolist())
    if not ws.store.exists(kind, key):
        with ws.store.writer(kind, key, {"key_parts": ws.key_parts, "size": size, "n": len(index)}) as tmp:
            out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(index), size, size, 3))
            for start in range(0, len(index), _CHUNK):
                out[start : start + _CHUNK] = _load_uint8(split, index[start : start + _CHUNK], size)
            out.flush()
            del out
    arrays, _ = ws.store.load_arrays(kind, key, mmap=True)
    return arrays["images"], labels, index


def normalise_images(images: np.ndarray, data) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 → ``[N, 3, S, S]`` float32, resized to ``data.input_size`` and
    normalised with ``data.mean`` / ``data.std`` (as :class:`~cfdebug.data.dataset.TorchSplit`)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise CfdebugError(f"Expected images [N, H, W, 3] uint8, but got {images.dtype} of shape {list(images.shape)}.")
    size = data.input_size
    if images.shape[1:3] != (size, size):
        images = np.stack([_resize(im, size) for im in images]) if len(images) else np.zeros((0, size, size, 3), np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, S, S] in [0, 1]
    mean = torch.tensor(data.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: np.ndarray, data, device, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, K]`` float32 of ``model`` (eval mode; its mode is restored) on uint8 ``images``."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalise_images(images[start : start + batch_size], data).to(device)
            out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise CfdebugError("Expected at least one image to evaluate, but got none.")
    return torch.cat(out).numpy()


def calibration_metrics(probs, labels, n_bins: int = 15, with_bins: bool = False) -> dict:
    """``{"accuracy", "ece", "nll", "brier"}`` (floats; Brier in ``[0, 2]``) of ``probs`` [N, K].

    With ``with_bins`` the reliability bins (:func:`cfdebug.metrics.reliability_bins`) are added
    under ``"bins"``.
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    out = {
        "accuracy": float(np.mean(probs.argmax(1) == labels)),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
    }
    if with_bins:
        out["bins"] = reliability_bins(probs, labels, n_bins)
    return out


def evaluate_calibration(model, images: np.ndarray, labels, data, device, *, temperature: float = 1.0, n_bins: int = 15) -> dict:
    """Accuracy, ECE, NLL, Brier and reliability bins of ``model`` on uint8 ``images``.

    Args:
        model: the classifier.
        images: ``[N, H, W, 3]`` uint8 (clean or corrupted), resized and normalised here.
        labels: ``[N]`` int true classes.
        data: the workspace's :class:`~cfdebug.data.DataBundle` (input size, mean, std).
        device: where the model runs.
        temperature: the softmax temperature (1 = none; a fitted one for ``+TS``).
        n_bins: ECE / reliability bins.

    Returns:
        ``{"accuracy", "ece", "nll", "brier", "bins"}``.
    """
    logits = predict_images(model, images, data, device)
    return calibration_metrics(apply_temperature(logits, temperature), labels, n_bins, with_bins=True)


# --------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------


def explanation_table(
    ws,
    ks: Sequence[int],
    betas: Sequence[float],
    modes: Sequence[str] = TABLE1_MODES,
    *,
    selector: SelectorConfig | None = None,
    split: str = "test",
    seed: int = 0,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict]:
    """Paper B's Table 1 on ``split``: one row per (k, β, mode), and per k for random masks.

    Args:
        ws: the workspace (black box, data, store: selectors and masks are cached).
        ks, betas: the grid (``k`` in 1..d; ``β`` ≥ 0).
        modes: any of ``"XCR"`` (selector fit to the true labels), ``"VIBI"`` (fit to the black
            box's predictions), ``"random"`` (random k-hot masks, seeded with ``seed``).
        selector: the other selector fields (default :meth:`SelectorConfig.demo`); ``k``,
            ``beta`` and ``target`` are set per row and masks are always hard top-k.
        split: the split scored (never used to train anything).
        progress, should_stop: as in :func:`cfdebug.xcr.selector.train_selector`.

    Returns:
        Rows ``{"k", "beta" (None for random), "mode", "accuracy", "accuracy_of"
        ("approximator" | "black box"), "masked_acc", "avg_drop", "avg_inc", "fidelity",
        "sufficiency", "n_images", "vibi_same_as_xcr"}``. ``vibi_same_as_xcr`` is True on VIBI rows
        when the black box predicts every training label correctly: VIBI's targets are then the
        labels and its selector is XCR's (trained once).
    """
    modes = list(modes)
    bad = [m for m in modes if m not in TABLE1_MODES]
    if bad or not modes:
        raise CfdebugError(f"Expected `modes` to be some of {', '.join(TABLE1_MODES)}, but got {modes!r}.")
    ks, betas = list(ks), [float(b) for b in betas]
    if not ks or (not betas and any(m != "random" for m in modes)):
        raise CfdebugError("Expected at least one `k` and one `beta` for Table 1, but got an empty list.")
    if split not in ws.data.splits:
        raise CfdebugError(f"Expected `split` to be one of {', '.join(ws.data.splits)}, but got {split!r}.")
    base = replace(selector or SelectorConfig.demo(), mode="Topk")
    size = ws.data.input_size
    d = num_patches(size, size, base.patch_size)
    for k in ks:
        check_k(k, d)
    data = ws.data.torch_split(split)
    labels = np.asarray(ws.data.splits[split].labels)
    device = torch.device(ws.device)

    # VIBI imitates the black box's predicted classes on the training split; where those equal
    # the labels on every training image (a model that fits its training set, like the demo CNN)
    # VIBI trains on exactly XCR's targets with the same seed, so its selector is XCR's and is
    # not trained twice (the row says so in `vibi_same_as_xcr`).
    vibi_is_xcr = False
    if "VIBI" in modes and "XCR" in modes:
        from ..training import predict_logits

        train_pred = predict_logits(ws.model, ws.data, "train", device).argmax(1)
        vibi_is_xcr = bool(np.array_equal(train_pred, np.asarray(ws.data.splits["train"].labels)))
    jobs = [(k, beta, mode) for k in ks for beta in betas for mode in modes if mode != "random"]
    jobs += [(k, None, "random") for k in ks if "random" in modes]
    rows = []
    for j, (k, beta, mode) in enumerate(jobs):
        if should_stop is not None and should_stop():
            from ..runs import RunCancelled

            raise RunCancelled("Table 1 was stopped")
        label = f"Table 1 ({j + 1}/{len(jobs)}): {mode} k={k}" + ("" if beta is None else f" β={beta:g}") + ": "
        step = scaled_progress(progress, j / len(jobs), (j + 1) / len(jobs), label)
        if mode == "random":
            masks = random_masks(len(labels), d, k, seed)
            full, masked = masked_probabilities(ws.model, data, masks, base.patch_size, device)
            accuracy, accuracy_of = float(np.mean(masked.argmax(1) == labels)), "black box"
        else:
            same = mode == "VIBI" and vibi_is_xcr
            cfg = replace(base, k=k, beta=beta, target="labels" if mode == "XCR" or same else "blackbox")
            masks = selector_masks(ws, cfg, split, step, should_stop).masks
            sel, approx, _ = trained_selector(ws, cfg)
            accuracy, accuracy_of = approximator_accuracy(sel, approx, data, k, cfg.patch_size, device), "approximator"
            full, masked = masked_probabilities(ws.model, data, masks, base.patch_size, device)
        row = {"k": int(k), "beta": beta, "mode": mode, "accuracy": float(accuracy), "accuracy_of": accuracy_of,
               "masked_acc": float(np.mean(masked.argmax(1) == labels))}
        row.update(explanation_metrics(full, masked))
        row["n_images"] = int(len(labels))
        row["vibi_same_as_xcr"] = bool(mode == "VIBI" and vibi_is_xcr)
        rows.append(row)
        if progress is not None:
            progress((j + 1) / len(jobs), label + f"accuracy {row['accuracy']:.3f}, Avg Drop {row['avg_drop']:.3f}, Avg Inc {row['avg_inc']:.3f}")
    return rows


# --------------------------------------------------------------------------------------------
# Corrupted test sets
# --------------------------------------------------------------------------------------------


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(chunk)]).generate_state(1)[0])


def _corrupted_chunks(ws, config: XCRConfig, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Iterator[tuple[str, int, list[tuple[np.ndarray, np.ndarray]]]]:
    """Yield ``(name, severity, chunks)``; ``chunks`` is a lazy iterable of ``(images uint8, labels)``."""
    for name in config.corruptions:
        for severity in config.severities:
            if config.cifar10c_dir is not None:
                full_labels = np.asarray(ws.data.splits["test"].labels)
                c_images, c_labels = load_cifar10c(config.cifar10c_dir, name, severity, labels=full_labels)
                if c_labels.max(initial=0) >= ws.data.num_classes:
                    raise CfdebugError(
                        f"Expected CIFAR-10-C labels in 0..{ws.data.num_classes - 1} for this workspace's "
                        f"{ws.data.num_classes} classes, but got {int(c_labels.max())}. Use CIFAR-10-C with a CIFAR-10 model."
                    )
                c_images, c_labels = c_images[index], c_labels[index]
                chunks = [(c_images[s : s + _CHUNK], c_labels[s : s + _CHUNK]) for s in range(0, len(c_images), _CHUNK)]
            else:
                chunks = (
                    (corrupt(images[s : s + _CHUNK], name, severity, _chunk_seed(config.corruption_seed, s // _CHUNK)), labels[s : s + _CHUNK])
                    for s in range(0, len(images), _CHUNK)
                )
            yield name, severity, chunks


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _pool_bins(pooled: dict | None, bins: dict) -> dict:
    """Add reliability ``bins`` into running sums (count, Σconfidence, Σcorrect per bin)."""
    count = np.asarray(bins["count"], dtype=np.float64)
    conf = np.nan_to_num(np.asarray(bins["confidence"], dtype=np.float64)) * count
    acc = np.nan_to_num(np.asarray(bins["accuracy"], dtype=np.float64)) * count
    if pooled is None:
        return {"bin_lower": np.asarray(bins["bin_lower"]), "bin_upper": np.asarray(bins["bin_upper"]), "count": count, "conf_sum": conf, "acc_sum": acc}
    pooled["count"] = pooled["count"] + count
    pooled["conf_sum"] = pooled["conf_sum"] + conf
    pooled["acc_sum"] = pooled["acc_sum"] + acc
    return pooled


def _finish_bins(pooled: dict) -> dict:
    count = pooled["count"]
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, pooled["acc_sum"] / count, np.nan)
        confidence = np.where(count > 0, pooled["conf_sum"] / count, np.nan)
    return {"bin_lower": pooled["bin_lower"], "bin_upper": pooled["bin_upper"], "accuracy": accuracy,
            "confidence": confidence, "count": count.astype(np.int64)}


def report_key(ws, config: XCRConfig) -> str:
    """Cache key of a report: the workspace's inputs, the config and the report format."""
    return stable_hash(REPORT_KIND, REPORT_FORMAT, ws.key_parts, config_dict(config))


def _check_inputs(ws, config: XCRConfig) -> int:
    d = config.check_against(ws.data.input_size)
    for split in ("train", "val", "test"):
        if len(ws.data.splits[split]) == 0:
            raise CfdebugError(f"Expected a non-empty `{split}` split for the XCR report, but it has no images.")
    if config.corruptions and config.cifar10c_dir is None and ws.data.input_size < MIN_IMAGE_SIZE:
        raise CfdebugError(
            f"Expected images of at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} pixels for the corruptions, but the model's "
            f"input size is {ws.data.input_size}. Use a larger input size, or evaluate without corruptions (corruptions=[])."
        )
    if config.cifar10c_dir is not None and config.corruptions:
        _check_cifar10c(Path(config.cifar10c_dir), config.corruptions, len(ws.data.splits["test"]))
    return d


def _check_cifar10c(root: Path, names: Sequence[str], n_test: int) -> None:
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


def run_xcr_report(
    ws,
    config: XCRConfig | None = None,
    progress: Progress | None = None,
    registry=None,
    run_id: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    run_dir: str | Path | None = None,
    use_cache: bool = True,
) -> dict:
    """Paper B's Tables 1 and 2 for ``ws``: selector, retraining, calibration under corruption.

    Steps: Table 1 (:func:`explanation_table` over ``config.table1_ks × table1_betas``);
    training masks of ``config.selector``; for each seed a vanilla and an XCR retraining
    (and a random-mask one with ``config.random_baseline``) with the same schedule; a
    validation-fitted temperature per model; accuracy/ECE/NLL/Brier of every model without
    and with its temperature on the clean test split and on each corruption × severity.

    Args:
        ws: the workspace.
        config: :class:`XCRConfig` (default :func:`~cfdebug.xcr.retrain.default_xcr_config`).
        progress: ``progress(fraction in [0, 1], message)``.
        registry, run_id: a :class:`~cfdebug.runs.RunRegistry` and run id: progress rows
            ``{"fraction", "message", "stage"}`` (and the retraining's epoch rows) are logged
            there, its cancel flag is polled (raising :class:`~cfdebug.runs.RunCancelled`), and
            the retraining checkpoints go to ``run_dir`` (default: the run's folder) so a
            relaunched run resumes. The caller stores the result (``registry.set_result``).
        should_stop: polled between steps; True raises :class:`~cfdebug.runs.RunCancelled`.
        run_dir: checkpoint folder for the retraining runs (resume); default none without a registry.
        use_cache: return a stored report for the same workspace and config when there is one.

    Returns:
        A JSON-ready dict: ``table1`` (rows, :data:`TABLE1_COLUMNS` + ``accuracy_of``,
        ``masked_acc``, ``n_images``); ``table2`` (rows, :data:`TABLE2_COLUMNS` + ``n_seeds``,
        ``temperature`` (mean fitted T; 1 without TS)); ``per_corruption`` (rows ``{"method",
        "corruption", "severity", "accuracy", "ece", "nll", "brier"}``, means over seeds);
        ``per_seed`` (Table 2 per seed); ``reliability`` (``{"clean"|"corrupt": {method: bins}}``,
        bins pooled over seeds, and over corruptions for ``corrupt``); ``temperatures``
        (``{method: [T per seed]}``); ``retrain`` (per method and seed: best epoch, accuracy,
        history); ``selector`` (config, validation/test accuracy of the approximator, ``d``);
        ``config``; ``settings`` (a one-line description); ``seconds``; ``cache_hit``.
    """
    from ..runs import RunCancelled
    from .retrain import default_xcr_config

    config = xcr_config_from_dict(config) if isinstance(config, dict) else (config or default_xcr_config(ws.config))
    if (registry is None) != (run_id is None):
        raise CfdebugError("Expected both `registry` and `run_id`, or neither.")
    d = _check_inputs(ws, config)
    store, key = ws.store, report_key(ws, config)
    if use_cache and store.exists(REPORT_KIND, key):
        with open(store.path(REPORT_KIND, key) / "result.json") as handle:
            result = json.load(handle)
        result["cache_hit"] = True
        if progress is not None:
            progress(1.0, "XCR report read from the cache")
        if registry is not None:
            registry.log_progress(run_id, {"fraction": 1.0, "message": "XCR report read from the cache", "stage": "done"})
        return result

    started = time.perf_counter()
    stage = {"name": "table1"}

    def stop() -> bool:
        if should_stop is not None and should_stop():
            return True
        return registry is not None and registry.cancel_requested(run_id)

    def check() -> None:
        if stop():
            raise RunCancelled(f"XCR report {'run ' + repr(run_id) + ' ' if run_id else ''}was cancelled")

    def report(fraction: float, message: str) -> None:
        lo, hi = _STAGES[stage["name"]]
        overall = lo + (hi - lo) * min(max(fraction, 0.0), 1.0)
        if progress is not None:
            progress(overall, message)
        if registry is not None:
            registry.log_progress(run_id, {"fraction": overall, "message": message, "stage": stage["name"]})

    if run_dir is None and registry is not None:
        run_dir = registry.run_dir(run_id)
    device = torch.device(ws.device)

    # ---- Table 1 (selectors and masks are cached in the store)
    table1 = explanation_table(
        ws, config.table1_ks, config.table1_betas, TABLE1_MODES, selector=config.selector,
        seed=config.selector.seed, progress=report, should_stop=stop,
    ) if config.table1_ks else []

    # ---- the retraining selector and its masks
    stage["name"] = "retrain"
    check()
    methods = ["vanilla", "xcr"] + (["random"] if config.random_baseline else [])
    runs_total = len(config.seeds) * len(methods)
    report(0.0, f"selector k={config.k} β={config.selector.beta:g} for retraining")
    masks = {"xcr": training_masks(ws, config, "xcr", None, stop)}
    if config.random_baseline:
        masks["random"] = training_masks(ws, config, "random")
    sel, approx, sel_meta = trained_selector(ws, config.selector)
    test_split = ws.data.torch_split("test")
    selector_masks(ws, config.selector, "test")  # cached for the dashboard's mask gallery
    selector_info = {
        "config": config_dict(config.selector),
        "d": d,
        "best_val_acc": sel_meta["history"]["best_val_acc"],
        "test_acc": approximator_accuracy(sel, approx, test_split, config.k, config.patch_size, device, config.selector.mode),
    }

    models: dict[str, list] = {m: [] for m in methods}
    temperatures: dict[str, list[float]] = {m: [] for m in methods}
    retrain_info: dict[str, list[dict]] = {m: [] for m in methods}
    done = 0
    for seed in config.seeds:
        for method in methods:
            check()
            prefix = f"retrain {done + 1}/{runs_total} ({method}, seed {seed}): "
            sub = scaled_progress(report, done / runs_total, (done + 1) / runs_total, prefix)
            folder = None if run_dir is None else Path(run_dir) / f"{method}-seed{seed}"
            if method == "vanilla":
                result = vanilla_retrain(ws, config, seed, sub, run_dir=folder, registry=registry, run_id=run_id)
            else:
                result = counterfactual_retrain(ws, config, seed, masks[method], sub, run_dir=folder, registry=registry,
                                                run_id=run_id, method=method)
            models[method].append(result.model)
            temperatures[method].append(fit_val_temperature(result.model, ws.data, device))
            retrain_info[method].append({"seed": int(seed), "best_epoch": result.best_epoch, "accuracy": result.accuracy,
                                         "history": result.history, "resumed_from": result.resumed_from})
            done += 1

    # ---- calibration on clean and corrupted test images
    stage["name"] = "evaluate"
    check()
    n_seeds = len(config.seeds)
    variants = [(m, ts) for m in methods for ts in (False, True)]
    names = {(m, ts): m + ("+TS" if ts else "") for m, ts in variants}

    def score(images_chunks: Iterable[tuple[np.ndarray, np.ndarray]]):
        """Per (method, seed): logits over all chunks, then metrics without/with temperature."""
        logits = {(m, s): [] for m in methods for s in range(n_seeds)}
        all_labels = []
        for images, labels in images_chunks:
            all_labels.append(labels)
            for m in methods:
                for s, model in enumerate(models[m]):
                    logits[(m, s)].append(predict_images(model, images, ws.data, device))
        labels = np.concatenate(all_labels)
        out = {}
        for m, ts in variants:
            for s in range(n_seeds):
                z = np.concatenate(logits[(m, s)])
                out[(names[(m, ts)], s)] = calibration_metrics(apply_temperature(z, temperatures[m][s] if ts else 1.0), labels, config.n_bins, with_bins=True)
        return out

    clean_images, clean_labels, _ = test_images(ws)
    clean = score([(clean_images[s : s + _CHUNK], clean_labels[s : s + _CHUNK]) for s in range(0, len(clean_images), _CHUNK)])
    del clean_images
    c_images, c_labels, c_index = test_images(ws, config.max_corrupt_images, config.corruption_seed)
    sets = [(c, s) for c in config.corruptions for s in config.severities]
    corrupted = {}
    for j, (name, severity, chunks) in enumerate(_corrupted_chunks(ws, config, c_images, c_labels, c_index)):
        check()
        corrupted[(name, severity)] = score(chunks)
        report((j + 1) / max(len(sets), 1), f"evaluated {name} severity {severity} ({j + 1}/{len(sets)})")

    # ---- tables
    method_names = [names[v] for v in variants]
    per_seed, table2, per_corruption = [], [], []
    reliability = {"clean": {}, "corrupt": {}}
    for method in method_names:
        seed_rows = []
        pooled_clean = pooled_corrupt = None
        for s in range(n_seeds):
            row = {"method": method, "seed": int(config.seeds[s])}
            for metric, short in zip(METRICS, ("acc", "ece", "nll", "brier")):
                row[f"clean_{short}"] = clean[(method, s)][metric]
                row[f"corrupt_{short}"] = float(np.mean([corrupted[c][(method, s)][metric] for c in sets])) if sets else None
            seed_rows.append(row)
            pooled_clean = _pool_bins(pooled_clean, clean[(method, s)]["bins"])
            for c in sets:
                pooled_corrupt = _pool_bins(pooled_corrupt, corrupted[c][(method, s)]["bins"])
        per_seed += seed_rows
        mean_row = {"method": method}
        for col in TABLE2_COLUMNS[1:]:
            values = [r[col] for r in seed_rows if r[col] is not None]
            mean_row[col] = float(np.mean(values)) if values else None
        mean_row["n_seeds"] = n_seeds
        base_method = method.removesuffix("+TS")
        mean_row["temperature"] = float(np.mean(temperatures[base_method])) if method.endswith("+TS") else 1.0
        table2.append(mean_row)
        reliability["clean"][method] = _finish_bins(pooled_clean)
        if pooled_corrupt is not None:
            reliability["corrupt"][method] = _finish_bins(pooled_corrupt)
        for name, severity in sets:
            row = {"method": method, "corruption": name, "severity": int(severity)}
            for metric in METRICS:
                row[metric] = float(np.mean([corrupted[(name, severity)][(method, s)][metric] for s in range(n_seeds)]))
            per_corruption.append(row)

    result = {
        "table1": table1,
        "table2": table2,
        "per_corruption": per_corruption,
        "per_seed": per_seed,
        "reliability": reliability,
        "temperatures": temperatures,
        "retrain": retrain_info,
        "selector": selector_info,
        "config": config_dict(config),
        "workspace": {"model": ws.config.model.name, "data": ws.data.name, "n_test": int(len(clean_labels)),
                      "n_corrupt": int(len(c_labels)) if sets else 0, "input_size": ws.data.input_size},
        "settings": describe_settings(config),
        "seconds": time.perf_counter() - started,
        "cache_hit": False,
    }
    result = jsonable(result)
    with store.writer(REPORT_KIND, key, {"config": config_dict(config), "key_parts": ws.key_parts, "format": REPORT_FORMAT}) as tmp:
        with open(tmp / "result.json", "w") as handle:
            json.dump(result, handle)
    report(1.0, f"XCR report done in {result['seconds']:.0f} s")
    return result


def describe_settings(config: XCRConfig) -> str:
    """One line with the settings that shape the numbers (printed under the tables)."""
    sel = config.selector
    corr = f"{len(config.corruptions)} corruptions × severities {','.join(map(str, config.severities))}" if config.corruptions else "no corruptions"
    source = f" from CIFAR-10-C files in {config.cifar10c_dir}" if config.cifar10c_dir else ""
    return (
        f"selector k={sel.k}, β={sel.beta:g}, p={sel.patch_size}, {sel.mode}, {sel.epochs} epochs at lr {sel.lr:g}; "
        f"retraining {config.epochs} epochs, {config.optimizer} lr {config.lr:g}, trainable {config.trainable}, init {config.init}, "
        f"seeds {','.join(map(str, config.seeds))}; {corr}{source}"
    )


def xcr_run_from_config(run_json, run_id: str | None = None, progress: Progress | None = None) -> dict:
    """Run an XCR report as a registered background run (what ``cfdebug xcr --config`` does).

    ``run_json``: the path of a run's ``run.json`` (written by ``RunRegistry.create(kind="xcr",
    config={"workspace": config_dict(WorkspaceConfig), "xcr": config_dict(XCRConfig)})``) or
    its ``config`` dict. With ``run_id`` the run is wrapped in :func:`cfdebug.runs.run_context`
    (status, cancel by SIGTERM), logs progress, resumes its retraining checkpoints and stores
    the result with ``set_result``; without, it just runs. Returns the result dict.
    """
    from ..config import workspace_config_from_dict
    from ..runs import RunRegistry, run_context
    from ..workspace import Workspace

    if isinstance(run_json, (str, Path)):
        path = Path(run_json)
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CfdebugError(f"Expected a readable run.json at {path}, but reading it failed ({exc}).") from None
        payload = payload.get("config", payload)
    else:
        payload = dict(run_json)
    if "workspace" not in payload or "xcr" not in payload:
        raise CfdebugError(f"Expected the run config to hold `workspace` and `xcr`, but it holds {', '.join(payload) or 'nothing'}.")
    ws_config = workspace_config_from_dict(payload["workspace"])
    config = xcr_config_from_dict(payload["xcr"])
    if run_id is None:
        return run_xcr_report(Workspace(ws_config, progress), config, progress)
    registry = RunRegistry(ws_config.workdir)
    with run_context(registry, run_id):
        ws = Workspace(ws_config, progress)
        result = run_xcr_report(ws, config, progress, registry, run_id)
        registry.set_result(run_id, result)
    return result


# --------------------------------------------------------------------------------------------
# Benchmark: selector vs captum Occlusion
# --------------------------------------------------------------------------------------------


def _occlusion_masks(model, x: torch.Tensor, targets: torch.Tensor, k: int, patch_size: int, per_eval: int) -> torch.Tensor:
    """Top-k patches by captum ``Occlusion`` attribution: ``[B, d]`` bool."""
    from captum.attr import Occlusion

    p = patch_size
    attr = Occlusion(model).attribute(
        x, target=targets, sliding_window_shapes=(x.shape[1], p, p), strides=(x.shape[1], p, p), baselines=0.0,
        perturbations_per_eval=per_eval,
    )  # [B, C, H, W]; constant within a patch and across channels
    b, _, h, w = attr.shape
    score = attr.sum(1).reshape(b, h // p, p, w // p, p).sum((2, 4)).reshape(b, -1)  # [B, d] patch-major, row-major
    index = score.topk(k, dim=1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, index, True)


def bench_xcr(ws, n_images: int = 64, batch_size: int = 64, config: SelectorConfig | None = None, repeats: int = 3, progress: Progress | None = None) -> dict:
    """Explanation speed: selector masks/s against captum ``Occlusion`` on the same images.

    Both explain the black box's predicted class on the first ``n_images`` test images with
    ``k`` patches of side ``p``: the selector by its hard top-k; Occlusion by the ``k`` patches
    with the largest attribution (sliding window ``(3, p, p)``, stride ``p``, baseline 0 = the
    dataset mean after normalisation, ``d`` forward passes per image, batched
    ``batch_size`` perturbed images at a time). The selector is trained (and cached) first and
    its training time is not counted; its timing is the fastest of ``repeats`` passes.

    Returns:
        ``{"n_images", "k", "patch_size", "d", "device", "selector_seconds", "occlusion_seconds",
        "selector_masks_per_s", "occlusion_masks_per_s", "ratio", "target_ratio" (100),
        "selector_avg_drop", "occlusion_avg_drop", "selector_fidelity", "occlusion_fidelity"}``.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise CfdebugError(f"Expected `n_images` to be a positive integer, but got {n_images!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CfdebugError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise CfdebugError(f"Expected `repeats` to be a positive integer, but got {repeats!r}.")
    from .retrain import default_xcr_config

    cfg = replace(config or default_xcr_config(ws.config).selector, mode="Topk")
    size = ws.data.input_size
    d = num_patches(size, size, cfg.patch_size)
    k = check_k(cfg.k, d)
    device = torch.device(ws.device)
    split = ws.data.torch_split("test")
    n = min(n_images, len(split))
    if n == 0:
        raise CfdebugError("Expected test images to benchmark on, but the test split is empty.")
    x = torch.stack([split[i][0] for i in range(n)])  # [n, 3, S, S]
    selector, _, _ = trained_selector(ws, cfg, progress)
    model = ws.model.eval()
    with torch.no_grad():
        targets = torch.cat([model(x[s : s + 256].to(device)).argmax(1).cpu() for s in range(0, n, 256)])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    batches = [x[s : s + batch_size] for s in range(0, n, batch_size)]  # in-memory batches, as Occlusion gets them
    compute_masks(selector, batches[:1], k, device, batch_size)  # warm-up
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        sel_masks = compute_masks(selector, batches, k, device, batch_size)
        sync()
        best = min(best, time.perf_counter() - t0)
    selector_seconds = best

    # Occlusion: `batch_size` images at a time, `per_eval` perturbations of each per forward.
    chunk = max(1, min(n, batch_size))
    # Forwards of ~512 perturbed images (at most ~256 MB of inputs): Occlusion's own batching.
    image_bytes = 4 * x[0].numel()
    per_eval = max(1, min(512 // chunk, (256 << 20) // max(1, image_bytes * chunk)))
    occ = []
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n, chunk):
            occ.append(_occlusion_masks(model, x[s : s + chunk].to(device), targets[s : s + chunk].to(device), k, cfg.patch_size, per_eval).cpu())
            if progress is not None:
                progress(min(1.0, (s + chunk) / n), f"Occlusion {min(n, s + chunk)}/{n} images")
    sync()
    occlusion_seconds = time.perf_counter() - t0
    occ_masks = torch.cat(occ).numpy()

    out = {"n_images": n, "k": k, "patch_size": cfg.patch_size, "d": d, "device": str(device),
           "selector_seconds": selector_seconds, "occlusion_seconds": occlusion_seconds,
           "selector_masks_per_s": n / max(selector_seconds, 1e-12), "occlusion_masks_per_s": n / max(occlusion_seconds, 1e-12)}
    out["ratio"] = out["selector_masks_per_s"] / out["occlusion_masks_per_s"]
    out["target_ratio"] = 100.0
    for name, masks in (("selector", sel_masks), ("occlusion", occ_masks)):
        full, masked = masked_probabilities(model, batches, masks, cfg.patch_size, device)
        m = explanation_metrics(full, masked)
        out[f"{name}_avg_drop"], out[f"{name}_fidelity"] = m["avg_drop"], m["fidelity"]
    return jsonable(out)


# --------------------------------------------------------------------------------------------
# Gallery helper and text tables
# --------------------------------------------------------------------------------------------


def explanation_images(image: np.ndarray, mask, patch_size: int, mean: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Display images of one explanation: ``(mask [S, S, 3] uint8, T(x) [S, S, 3] uint8)``.

    Args:
        image: ``[S, S, 3]`` uint8 at the model's input size.
        mask: ``[d]`` bool/float patch mask (row-major patches of side ``patch_size``).
        patch_size: ``p``.
        mean: the normalisation mean (a dropped patch shows the dataset mean colour, which is
            what 0 after normalisation is).
    """
    image = np.asarray(image)
    s = image.shape[0]
    g = s // patch_size
    m = np.asarray(mask, dtype=np.float32).reshape(g, g)
    if m.max() > 0:
        m = m / m.max()  # a softmax map is shown relative to its largest patch
    up = np.kron(m, np.ones((patch_size, patch_size), np.float32))[..., None]  # [S, S, 1]
    fill = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3) * 255.0
    tx = image.astype(np.float32) * up + fill * (1 - up)
    mask_img = np.repeat((up * 255).astype(np.uint8), 3, axis=2)
    return mask_img, tx.clip(0, 255).astype(np.uint8)


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def format_table1(result: dict) -> str:
    """Table 1 as text: k, β, mode, accuracy, Avg Drop, Avg Inc, fidelity, sufficiency."""
    rows = [
        [str(r["k"]), "–" if r["beta"] is None else f"{r['beta']:g}", r["mode"], _fmt(r["accuracy"]), _fmt(r["avg_drop"]),
         _fmt(r["avg_inc"]), _fmt(r["fidelity"]), _fmt(r["sufficiency"])]
        for r in result["table1"]
    ]
    title = "Table 1: explanation metrics on the test split (accuracy: approximator on T(x); random: black box on T(x))"
    return title + "\n" + _table(["k", "β", "mode", "accuracy", "Avg Drop", "Avg Inc", "fidelity", "sufficiency"], rows)


def format_table2(result: dict) -> str:
    """Table 2 as text: accuracy, ECE, NLL, Brier, clean and corrupt, per method (mean over seeds)."""
    rows = [
        [r["method"], _fmt(r["clean_acc"]), _fmt(r["corrupt_acc"]), _fmt(r["clean_ece"]), _fmt(r["corrupt_ece"]),
         _fmt(r["clean_nll"]), _fmt(r["corrupt_nll"]), _fmt(r["clean_brier"]), _fmt(r["corrupt_brier"])]
        for r in result["table2"]
    ]
    n = result["table2"][0]["n_seeds"] if result["table2"] else 0
    title = f"Table 2: calibration, clean and corrupted test images (mean over {n} seed{'s' if n != 1 else ''}; +TS = temperature fitted on val)"
    text = title + "\n" + _table(["method", "acc clean", "acc corrupt", "ECE clean", "ECE corrupt", "NLL clean", "NLL corrupt",
                                  "Brier clean", "Brier corrupt"], rows)
    if result.get("settings"):
        text += "\n" + result["settings"]
    return text


def format_bench(out: dict) -> str:
    """One paragraph for :func:`bench_xcr`'s result (what ``cfdebug bench xcr`` prints)."""
    verdict = "meets" if out["ratio"] >= out["target_ratio"] else "misses"
    return (
        f"XCR selector vs captum Occlusion (window 3×{out['patch_size']}×{out['patch_size']}, stride {out['patch_size']}, "
        f"top-{out['k']} of {out['d']} patches) on {out['n_images']} test images, device {out['device']}:\n"
        f"  selector  {out['selector_masks_per_s']:10.1f} masks/s   Avg Drop {out['selector_avg_drop']:.3f}   fidelity {out['selector_fidelity']:.3f}\n"
        f"  Occlusion {out['occlusion_masks_per_s']:10.1f} masks/s   Avg Drop {out['occlusion_avg_drop']:.3f}   fidelity {out['occlusion_fidelity']:.3f}\n"
        f"  ratio {out['ratio']:.0f}× ({verdict} the target ≥ {out['target_ratio']:.0f}×)"
    )


def print_table1(result: dict, file=None) -> str:
    """Print :func:`format_table1` (to stdout by default) and return the text."""
    text = format_table1(result)
    print(text, file=file or sys.stdout)
    return text


def print_table2(result: dict, file=None) -> str:
    """Print :func:`format_table2` (to stdout by default) and return the text."""
    text = format_table2(result)
    print(text, file=file or sys.stdout)
    return text
