"""Calibration, explanation, detection, set-agreement and per-class metrics, one module per job:
``calibration`` (ECE, NLL, Brier, the accumulator, temperature scaling), ``explanation`` (paper
B's Table 1), ``detection`` (error-detection scores, set agreement) and ``confusion`` (confusion
matrix, per-class recall, accuracy, prediction churn). ``from cfdebug.metrics import X`` works
for every name below.

Pure functions: no I/O, no global state, inputs are never modified. The one stateful piece,
:class:`CalibrationAccumulator`, pools the calibration metrics over chunks (torchmetrics'
functional + stateful pattern); its result equals the functions' on the concatenation. Every function accepts
``torch.Tensor`` (any device; detached and copied to the CPU) or ``numpy`` arrays (or nested
lists), computes in float64 numpy and returns Python floats, numpy arrays or dicts of them.
Arguments are validated and a user mistake raises :class:`cfdebug.errors.CfdebugError` with a
message in torchmetrics' form ("Expected `n_bins` to be a positive integer, but got 0").

Conventions shared by the functions below:

* ``probs`` is ``[N, K]`` float with entries in ``[0, 1]`` and rows summing to 1 (within
  ``1e-3``, so float16/float32 softmax outputs pass); ``N >= 1``.
* ``labels`` / ``pred`` are ``[N]`` integer class indices in ``0..K-1``.
* The predicted class of a row of ``probs`` is its ``argmax`` (first index on ties) and its
  confidence is the row maximum ("top-label confidence").

Definitions follow ``METHODS.md`` (sections "Calibration", "Explanation metrics" and
"Agreement and detection").
"""

from .calibration import (
    CalibrationAccumulator,
    apply_temperature,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    softmax,
)
from .confusion import accuracy, confusion_matrix, per_class_recall, prediction_churn
from .detection import error_detection_curve, error_detection_scores, set_agreement
from .explanation import average_drop, average_increase, explanation_metrics, fidelity, sufficiency

__all__ = [
    "accuracy",
    "apply_temperature",
    "average_drop",
    "average_increase",
    "brier_score",
    "CalibrationAccumulator",
    "confusion_matrix",
    "error_detection_curve",
    "error_detection_scores",
    "expected_calibration_error",
    "explanation_metrics",
    "fidelity",
    "fit_temperature",
    "negative_log_likelihood",
    "per_class_recall",
    "prediction_churn",
    "reliability_bins",
    "set_agreement",
    "softmax",
    "sufficiency",
]
