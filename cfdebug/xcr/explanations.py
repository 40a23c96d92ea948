"""Paper B's Table 1 (explanation quality of XCR, VIBI and random masks) and the gallery helper.

For each ``k`` and ``β``, a selector trained against the true labels (XCR) and one imitating the
black box (VIBI), plus random k-hot masks (one row per ``k``; β does not apply). Columns:
``accuracy`` (the approximator on ``T(x)`` of the test split, the paper's "Accuracy"; for random
masks, which have no approximator, the black box on ``T(x)``; ``accuracy_of`` says which),
``masked_acc`` (the black box on ``T(x)``, every row), and the black box's ``fidelity``,
``avg_drop``, ``avg_inc``, ``sufficiency`` on the hard top-k ``T(x)``
(:func:`cfdebug.metrics.explanation_metrics`, fractions, not percent).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import CfdebugError
from ..metrics import explanation_metrics
from ..runtime import Progress, scaled_progress
from .patches import check_k, num_patches
from .selector import (
    SelectorConfig,
    approximator_accuracy,
    masked_probabilities,
    random_masks,
    selector_masks,
    trained_selector,
)

__all__ = ["TABLE1_MODES", "TABLE1_COLUMNS", "explanation_table", "explanation_images"]

TABLE1_MODES = ("XCR", "VIBI", "random")
TABLE1_COLUMNS = ("k", "beta", "mode", "accuracy", "avg_drop", "avg_inc", "fidelity", "sufficiency")


def _check_grid(ws, ks, betas, modes, split: str) -> tuple[list[int], list[float], list[str]]:
    modes = list(modes)
    bad = [m for m in modes if m not in TABLE1_MODES]
    if bad or not modes:
        raise CfdebugError(f"Expected `modes` to be some of {', '.join(TABLE1_MODES)}, but got {modes!r}.")
    ks, betas = list(ks), [float(b) for b in betas]
    if not ks or (not betas and any(m != "random" for m in modes)):
        raise CfdebugError("Expected at least one `k` and one `beta` for Table 1, but got an empty list.")
    if split not in ws.data.splits:
        raise CfdebugError(f"Expected `split` to be one of {', '.join(ws.data.splits)}, but got {split!r}.")
    return ks, betas, modes


def _vibi_is_xcr(ws, modes: Sequence[str], device) -> bool:
    # VIBI imitates the black box's predicted classes on the training split; where those equal
    # the labels on every training image (a model that fits its training set, like the demo CNN)
    # VIBI trains on exactly XCR's targets with the same seed, so its selector is XCR's and is
    # not trained twice (the row says so in `vibi_same_as_xcr`).
    if "VIBI" not in modes or "XCR" not in modes:
        return False
    from ..training import predict_logits

    train_pred = predict_logits(ws.model, ws.data, "train", device).argmax(1)
    return bool(np.array_equal(train_pred, np.asarray(ws.data.splits["train"].labels)))


def _table1_row(ws, base: SelectorConfig, job: tuple, split: str, d: int, seed: int, same_as_xcr: bool, step, should_stop) -> dict:
    """One Table 1 row: the masks of ``job = (k, beta, mode)`` on ``split`` and their metrics."""
    k, beta, mode = job
    device = torch.device(ws.device)
    data = ws.data.torch_split(split)
    labels = np.asarray(ws.data.splits[split].labels)
    if mode == "random":
        masks = random_masks(len(labels), d, k, seed)
        full, masked = masked_probabilities(ws.model, data, masks, base.patch_size, device)
        accuracy, accuracy_of = float(np.mean(masked.argmax(1) == labels)), "black box"
    else:
        same = mode == "VIBI" and same_as_xcr
        cfg = replace(base, k=k, beta=beta, target="labels" if mode == "XCR" or same else "blackbox")
        masks = selector_masks(ws, cfg, split, step, should_stop).masks
        sel, approx, _ = trained_selector(ws, cfg)
        accuracy, accuracy_of = approximator_accuracy(sel, approx, data, k, cfg.patch_size, device), "approximator"
        full, masked = masked_probabilities(ws.model, data, masks, base.patch_size, device)
    row = {"k": int(k), "beta": beta, "mode": mode, "accuracy": float(accuracy), "accuracy_of": accuracy_of,
           "masked_acc": float(np.mean(masked.argmax(1) == labels))}
    row.update(explanation_metrics(full, masked))
    row["n_images"] = int(len(labels))
    row["vibi_same_as_xcr"] = bool(mode == "VIBI" and same_as_xcr)
    return row


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
    ks, betas, modes = _check_grid(ws, ks, betas, modes, split)
    base = replace(selector or SelectorConfig.demo(), mode="Topk")
    size = ws.data.input_size
    d = num_patches(size, size, base.patch_size)
    for k in ks:
        check_k(k, d)
    same_as_xcr = _vibi_is_xcr(ws, modes, torch.device(ws.device))
    jobs = [(k, beta, mode) for k in ks for beta in betas for mode in modes if mode != "random"]
    jobs += [(k, None, "random") for k in ks if "random" in modes]
    rows = []
    for j, job in enumerate(jobs):
        if should_stop is not None and should_stop():
            from ..runs import RunCancelled

            raise RunCancelled("Table 1 was stopped")
        k, beta, mode = job
        label = f"Table 1 ({j + 1}/{len(jobs)}): {mode} k={k}" + ("" if beta is None else f" β={beta:g}") + ": "
        step = scaled_progress(progress, j / len(jobs), (j + 1) / len(jobs), label)
        row = _table1_row(ws, base, job, split, d, seed, same_as_xcr, step, should_stop)
        rows.append(row)
        if progress is not None:
            progress((j + 1) / len(jobs), label + f"accuracy {row['accuracy']:.3f}, Avg Drop {row['avg_drop']:.3f}, Avg Inc {row['avg_inc']:.3f}")
    return rows


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
