"""Counterfactual explanation (CFE) heads: minimum-correct (MC) and minimum-incorrect (MI) filters.

Paper A (after Tariq et al. 2022) explains a decision by the *filters* of the target layer: the
MC filters of image ``x`` for class ``c`` are a small set of channels that, kept alone, still
make the frozen classifier say ``c``; the MI filters are the channels whose activation must grow
to make it say an *alter* class instead.

* :mod:`.heads`: the MC/MI heads (``K`` stacked ``Dense(C→C)``) and what they predict (masks,
  keep rate, alter rate);
* :mod:`.classifier_head`: the frozen classifier head run on masked target-layer outputs,
  pooled or feature maps (:class:`MaskedHead`), and the VGG fast path (:class:`ChannelLinearHead`);
* :mod:`.losses`: the MC and MI losses;
* :mod:`.fitting`: the fit, a stage of the training engine (batch order, blocks);
* :mod:`.cache`: the workspace's heads, fitted on a cache miss and stored (:func:`mc_heads`,
  :func:`mi_heads`).
"""

from ..config import CFEConfig
from .cache import FittedHeads, heads_key, mc_heads, mi_heads
from .classifier_head import (
    MAP_BLOCK_ELEMENTS,
    ChannelLinearHead,
    MaskedHead,
    as_masked_head,
    class_spans,
    frozen_head,
    masked_head,
    masked_predictions,
    split_head_inputs,
)
from .fitting import batch_order, fit_mc_heads, fit_mi_heads
from .heads import MCHeads, MIHeads, alter_rate, keep_rate, predict_masks, second_most_probable, thresholded_relu
from .losses import mc_loss, mi_loss

__all__ = [
    "CFEConfig",
    "MAP_BLOCK_ELEMENTS",
    "MaskedHead",
    "ChannelLinearHead",
    "as_masked_head",
    "class_spans",
    "split_head_inputs",
    "masked_head",
    "alter_rate",
    "FittedHeads",
    "MCHeads",
    "MIHeads",
    "batch_order",
    "fit_mc_heads",
    "fit_mi_heads",
    "frozen_head",
    "heads_key",
    "keep_rate",
    "masked_predictions",
    "mc_heads",
    "mc_loss",
    "mi_heads",
    "mi_loss",
    "predict_masks",
    "second_most_probable",
    "thresholded_relu",
]
