"""Revise: fixes the user directs (Reveal to Revise's revise step), each against the same CE control.

The user says what is *not* evidence: a region of the input (``region-counterfactual``,
``region-rrr``), some target-layer filters (``filters``, ``filters-zero``) or an appearance
(``appearance``); cfdebug fine-tunes on the one engine with the control's schedule and seeds,
chooses epochs (and a region's fill) on counterfactual validation, re-evaluates on the test split
(accuracy, per-class recall, artifact sensitivity, flags left) and judges the method against the
control with paired verdicts (:func:`revise_verdicts`). METHODS.md "Revise" is the spec.
"""

from .methods import Declaration, declare, most_specific_filters, revise_sweep, validation_key, zero_filters
from .region import FILLS, Region, parse_region

__all__ = ["Declaration", "declare", "most_specific_filters", "revise_sweep", "validation_key", "zero_filters", "Region", "parse_region", "FILLS"]
