"""Calibration of retrained models on a stream of uint8 images (paper B, Table 2's metrics).

Accuracy, ECE (15 bins), NLL and Brier (``[0, 2]``) with and without a fitted temperature,
accumulated chunk by chunk in :class:`~cfdebug.metrics.CalibrationAccumulator`, so the logits
of a corrupted test set are never held all at once.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..metrics import CalibrationAccumulator, apply_temperature
from .images import predict_images

__all__ = ["calibration_metrics", "evaluate_calibration", "score_models"]


def calibration_metrics(probs, labels, n_bins: int = 15, with_bins: bool = False) -> dict:
    """``{"accuracy", "ece", "nll", "brier"}`` (floats; Brier in ``[0, 2]``) of ``probs`` [N, K].

    With ``with_bins`` the reliability bins (:func:`cfdebug.metrics.reliability_bins`) are added
    under ``"bins"``.
    """
    acc = CalibrationAccumulator(n_bins)
    acc.update(probs, labels)
    out = acc.compute()
    if not with_bins:
        del out["bins"]
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


def score_models(
    models: dict[str, list],
    temperatures: dict[str, list[float]],
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    data,
    device,
    n_bins: int = 15,
    keep_images: bool = False,
) -> dict[tuple[str, int], CalibrationAccumulator]:
    """Every model without and with its temperature on one image set, chunk by chunk.

    Args:
        models: ``{method: [model per seed]}``.
        temperatures: ``{method: [fitted T per seed]}``.
        chunks: ``(images [n, H, W, 3] uint8, labels [n] int)`` pairs; read once.
        data, device: as in :func:`evaluate_calibration`.
        n_bins: ECE / reliability bins.
        keep_images: the accumulators also keep each image's terms (paired verdicts need them).

    Returns:
        ``{(variant, seed index): CalibrationAccumulator}``, ``variant`` being ``method`` and
        ``method + "+TS"`` (softmax at the fitted temperature; same predictions).
    """
    out = {(m + ts, s): CalibrationAccumulator(n_bins, keep_images=keep_images) for m in models for ts in ("", "+TS") for s in range(len(models[m]))}
    for images, labels in chunks:
        for m, seeds in models.items():
            for s, model in enumerate(seeds):
                logits = predict_images(model, images, data, device)  # [n, K] float32
                out[(m, s)].update(apply_temperature(logits, 1.0), labels)
                out[(m + "+TS", s)].update(apply_temperature(logits, temperatures[m][s]), labels)
    return out
