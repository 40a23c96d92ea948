"""Paper B (XCR): explanation selector (``selector.py``) and counterfactual retraining.

The selector learns which ``k`` patches of an image suffice to classify it; its hard top-k
masks ``T(x)`` are the explanations and the counterfactual inputs for retraining.
"""

from .selector import (
    Approximator,
    PatchSelector,
    SelectorConfig,
    SelectorHistory,
    SelectorMasks,
    apply_mask,
    approximator_accuracy,
    check_k,
    compute_masks,
    kl_to_uniform,
    masked_probabilities,
    num_patches,
    random_masks,
    relaxed_mask,
    selection_map,
    selector_loss,
    selector_masks,
    topk_mask,
    train_selector,
    trained_selector,
)

__all__ = [
    "Approximator",
    "PatchSelector",
    "SelectorConfig",
    "SelectorHistory",
    "SelectorMasks",
    "apply_mask",
    "approximator_accuracy",
    "check_k",
    "compute_masks",
    "kl_to_uniform",
    "masked_probabilities",
    "num_patches",
    "random_masks",
    "relaxed_mask",
    "selection_map",
    "selector_loss",
    "selector_masks",
    "topk_mask",
    "train_selector",
    "trained_selector",
]
