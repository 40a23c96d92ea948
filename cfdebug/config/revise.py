"""Revise configs (METHODS.md "Revise"): what a user can declare not evidence, and the schedule a
method shares with its CE control."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import check_choice, check_real
from .treatment import FinetuneConfig

#: What a user can declare "not evidence", and how cfdebug fine-tunes against it.
REVISE_METHODS = ("region-counterfactual", "region-rrr", "filters", "filters-zero", "appearance")
#: The methods that need a region (``--region``) and those that need filters (``--filters``).
REGION_METHODS = ("region-counterfactual", "region-rrr")
FILTER_METHODS = ("filters", "filters-zero")
REVISE_FILLS = ("auto", "colour", "noise", "other-class")


@dataclass(frozen=True)
class ReviseConfig(FinetuneConfig):
    """How a revise method fine-tunes (METHODS.md "Revise"), and its CE control alike.

    The schedule is :class:`FinetuneConfig`'s with defaults that can move a model in a few epochs
    (Adam 1e-3, every layer, 5 epochs: the paper-A treatment schedule, SGD 1e-4 on the last block,
    changes no prediction of the demo model; a plain CE fine-tune with these defaults is the
    control). ``fill`` is the region counterfactual's fill (``auto``: chosen on counterfactual
    validation among ``colour``, ``noise``, ``other-class``); ``rrr_lambda`` weighs the input
    gradients inside the region (Ross et al. 2017); ``filter_lambda`` weighs paper A's ``L_nonMC``
    on the user's filters and ``lambda1`` its ``L_MC`` on what is left of each class's set;
    ``jitter`` the strength of the appearance counterfactual (colour jitter, hue up to
    ``jitter/2``, random greyscale with probability ``jitter/2``).
    """

    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"
    trainable: str = "all"
    fill: str = "auto"
    rrr_lambda: float = 1.0
    filter_lambda: float = 1e-3
    lambda1: float = 0.0
    jitter: float = 1.0

    def __post_init__(self):
        check_choice(self.fill, "fill", REVISE_FILLS)
        check_real(self.rrr_lambda, "rrr_lambda", 0.0, 1e6)
        check_real(self.filter_lambda, "filter_lambda", 0.0, 1e3)
        check_real(self.lambda1, "lambda1", 0.0, 1.0)
        check_real(self.jitter, "jitter", 0.0, 1.0)
        super().__post_init__()
