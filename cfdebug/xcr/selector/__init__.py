"""The XCR explanation selector (paper B, Sec. 3.1): L2X/VIBI patch selection by Gumbel top-k.

An image ``[3, H, W]`` is cut into ``d = (H/p)·(W/p)`` square patches of side ``p``. A small
ResNet-style CNN, the *selector*, gives every patch a log-probability ``log p(x) ∈ R^d`` (a
log-softmax over the ``d`` patches). While training, ``k`` patches are sampled with the
generalised Gumbel-softmax trick and relaxed into a mask ``z* ∈ [0, 1]^d`` so that the gradient
reaches the selector; a second small ResNet, the *approximator*, classifies
``T(x) = upsample(z) ⊙ x`` where ``z`` is ``z*`` itself or (the default, see
:func:`training_mask`) its hard top-k with ``z*``'s gradient. At evaluation the explanation is
the hard top-k of ``log p(x)``: exactly ``k`` patches.

XCR trains the approximator against the true labels (``target="labels"``); VIBI imitates the
black box (``target="blackbox"``). The loss is ``CE + β·KL(p(z|x) ‖ Uniform(d))`` with the
analytic ``KL = log d − H(p)``.

Masked pixels are 0 *after* normalisation (the dataset mean), as in the paper's reference
setting; :func:`apply_mask` multiplies the normalised tensor.

The trained selector and its masks are cached in the workspace store:
``xcr-selector/<key>`` (weights of the selector and the approximator, history, config) and
``xcr-masks/<key>`` (hard top-k masks ``[N, d]`` bool for one split, plus the softmax map
``[N, d]`` float32 when the selection mode is ``"Softmax"``).

One module per job: ``masks`` (the training sample, the evaluation maps, ``T(x)``, random
masks), ``networks`` (selector and approximator), ``training`` (the loss, the lr schedule, the
engine stage), ``evaluation`` (a trained selector run over data) and ``cache`` (the stored
selector and masks). The names below are its API.
"""

from ...config import SelectorConfig
from .cache import SELECTOR_KIND, SelectorMasks, masks_key, selector_key, selector_masks, trained_selector
from .evaluation import approximator_accuracy, compute_masks, masked_probabilities
from .masks import apply_mask, random_masks, relaxed_mask, selection_map, topk_mask, training_mask
from .networks import Approximator, PatchSelector, ResidualBlock
from .training import SelectorHistory, kl_to_uniform, lr_schedule, selector_loss, train_selector

__all__ = [
    "Approximator",
    "PatchSelector",
    "SelectorConfig",
    "SelectorHistory",
    "SelectorMasks",
    "ResidualBlock",
    "apply_mask",
    "approximator_accuracy",
    "compute_masks",
    "kl_to_uniform",
    "lr_schedule",
    "masked_probabilities",
    "masks_key",
    "random_masks",
    "relaxed_mask",
    "selection_map",
    "selector_key",
    "SELECTOR_KIND",
    "selector_loss",
    "selector_masks",
    "topk_mask",
    "trained_selector",
    "train_selector",
    "training_mask",
]
