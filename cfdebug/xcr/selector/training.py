"""Training the selector and the approximator: the loss ``CE + β·KL(p ‖ Uniform(d))``, the
learning-rate schedule and the training stage on the engine (:func:`cfdebug.training.run_epochs`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...config import SelectorConfig
from ...runtime import Progress, scaled_progress, seed_everything
from ...training import Stage, StepOutput, run_epochs
from ..patches import check_k, num_patches
from .evaluation import approximator_accuracy, approximator_scores
from .masks import apply_mask, training_mask
from .networks import Approximator, PatchSelector


def kl_to_uniform(log_p: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p ‖ Uniform(d)) = log d − H(p) = log d + Σ_j p_j log p_j``; ``[B]`` float ≥ 0.

    ``p log p`` is taken as 0 where ``p = 0`` (``log_p = -inf``), so a one-hot row gives ``log d``.
    """
    d = log_p.shape[1]
    # Clamping -inf to the most negative finite value makes 0·log 0 = 0 in the forward pass and
    # keeps the backward pass finite (a torch.where over a NaN branch would still leak NaN grads).
    finite = log_p.clamp(min=torch.finfo(log_p.dtype).min)
    return math.log(d) + (log_p.exp() * finite).sum(dim=1)


def selector_loss(approx_logits: torch.Tensor, target: torch.Tensor, log_p: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """``CE(approximator(T(x)), target) + β·KL(p(z|x) ‖ Uniform(d))``, both batch means.

    Args:
        approx_logits: ``[B, K]`` float logits of the approximator on ``T(x)``.
        target: ``[B]`` int64 classes (true labels for XCR, black-box predictions for VIBI).
        log_p: ``[B, d]`` float selector log-probabilities.
        beta: KL weight ≥ 0.

    Returns:
        ``{"loss", "ce", "kl"}`` scalar tensors (``loss`` carries the gradient).
    """
    ce = F.cross_entropy(approx_logits, target)
    kl = kl_to_uniform(log_p).mean()
    return {"loss": ce + beta * kl, "ce": ce, "kl": kl}


@dataclass
class SelectorHistory:
    """Training record of :func:`train_selector`.

    ``rows``: one engine history row per epoch (:data:`cfdebug.training.HISTORY_KEYS`): the mean
    training ``loss``, ``ce``, ``kl`` (per sample), the approximator's running accuracy on the
    relaxed training sample (``train_acc``), its validation accuracy and cross-entropy with the
    hard top-k mask (``val_acc``, ``val_loss``), its test accuracy (``test_acc``, logged only;
    NaN without a test split), with the softmax map ``val_acc_softmax`` (only in ``"Softmax"``
    mode) and the epoch's ``train_seconds`` / ``eval_seconds``. ``best_epoch`` / ``best_val_acc``:
    the kept epoch (highest ``val_acc``) and its ``val_acc``; ``seconds``: total wall time.
    """

    rows: list[dict]
    best_epoch: int
    best_val_acc: float
    seconds: float

    def as_dict(self) -> dict:
        return {"rows": self.rows, "best_epoch": self.best_epoch, "best_val_acc": self.best_val_acc, "seconds": self.seconds}


def _selector_scores(selector, approximator, data, config: SelectorConfig, device, val_loader) -> dict[str, float]:
    """An epoch's scores: top-k validation accuracy and loss, the softmax-map validation accuracy
    (Softmax mode), test accuracy. ``val_loader`` draws its base seed from the global RNG (as it
    always has: the Gumbel noise of the next epoch depends on that stream); the test pass draws
    from a private generator, so logging it changes nothing."""
    k, p = config.k, config.patch_size
    val_acc, val_loss = approximator_scores(selector, approximator, val_loader, k, p, device)
    scores = {"val_acc": val_acc, "val_loss": val_loss}
    if config.mode == "Softmax":
        scores["val_acc_softmax"] = approximator_accuracy(selector, approximator, val_loader, k, p, device, "Softmax")
    test_acc = float("nan")
    if "test" in data.splits:
        test = torch.utils.data.DataLoader(data.torch_split("test"), batch_size=256, generator=torch.Generator())
        test_acc = approximator_accuracy(selector, approximator, test, k, p, device)
    return {**scores, "test_acc": test_acc}


def _lr_factor(config: SelectorConfig, step: int, steps: int) -> float:
    """The factor on ``config.lr`` at optimizer step ``step`` (0-based) of ``steps``: 1 for
    ``schedule="constant"``; for ``"cosine"`` half a cosine from 1 down to 0."""
    if config.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def lr_schedule(optimizer: torch.optim.Optimizer, config: SelectorConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The selector's learning-rate schedule over ``steps`` optimizer steps, stepped once per batch:
    ``config.lr`` (the optimizer's initial rate) times :func:`_lr_factor` of the step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(config, step, steps))


def train_selector(workspace, config: SelectorConfig, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None):
    """Train the selector and approximator on ``workspace``'s training split (on the engine,
    :func:`cfdebug.training.run_epochs`).

    Adam on both networks' parameters, its learning rate following :func:`lr_schedule` (one
    scheduler step per batch); each step draws the training mask (:func:`training_mask`: the relaxed
    sample ``z*`` of ``config.k`` Gumbel draws at ``config.tau``, by default passed on as its
    hard top-k with ``z*``'s gradient), classifies ``T(x)`` and minimises :func:`selector_loss`. After every epoch the approximator is scored on the validation split
    with the hard top-k mask, and the epoch with the best score is kept (the test split is never
    used to choose anything). The top-k score decides in both selection modes: the training
    objective does not depend on ``config.mode`` (it only changes which map ``T(x)`` uses
    downstream), and the approximator never sees the softmax map while training, so its accuracy
    on ``p(x) ⊙ x`` is reported (``val_acc_softmax``) but would be a poor criterion.

    Args:
        workspace: a :class:`cfdebug.workspace.Workspace` (data, device; the black box for
            ``target="blackbox"``).
        config: a :class:`SelectorConfig`.
        progress: called as ``progress(fraction in [0, 1], message)`` after every epoch.
        should_stop: polled before every batch; when it returns True a
            :class:`cfdebug.runs.RunCancelled` is raised and nothing is kept.

    Returns:
        ``(selector, approximator, history)``: both networks in eval mode on the workspace
        device with the kept epoch's weights, and a :class:`SelectorHistory`.
    """
    data, device = workspace.data, workspace.device
    d = num_patches(data.input_size, data.input_size, config.patch_size)
    check_k(config.k, d)
    generator = seed_everything(config.seed)
    selector = PatchSelector(config.patch_size, 3, config.width).to(device)
    approximator = Approximator(data.num_classes, 3, config.width).to(device)
    optimizer = torch.optim.Adam(list(selector.parameters()) + list(approximator.parameters()), lr=config.lr)
    blackbox = workspace.model if config.target == "blackbox" else None
    if blackbox is not None:
        blackbox.eval()
    train_loader = torch.utils.data.DataLoader(data.torch_split("train"), batch_size=config.batch_size, shuffle=True, generator=generator)
    val_loader = torch.utils.data.DataLoader(data.torch_split("val"), batch_size=256)

    scheduler = lr_schedule(optimizer, config, config.epochs * len(train_loader))

    def step(batch, epoch: int, index: int) -> StepOutput:
        # The rate of batch g (0-based over all epochs) is the schedule's at step g: the scheduler
        # steps once per batch after the first (after the optimizer's step of the batch before).
        while scheduler.last_epoch < (epoch - 1) * len(train_loader) + index:
            scheduler.step()
        x, y = batch[0].to(device), batch[1].to(device)
        if blackbox is not None:
            with torch.no_grad():
                y = blackbox(x).argmax(1)  # VIBI: imitate the black box's decision
        log_p = selector(x)
        z = training_mask(log_p, config)
        logits = approximator(apply_mask(x, z, config.patch_size))
        return StepOutput(selector_loss(logits, y, log_p, config.beta), len(y), int((logits.argmax(1) == y).sum()))

    nets = nn.ModuleDict({"selector": selector, "approximator": approximator})
    stage = Stage(
        name="selector training", model=nets, optimizer=optimizer, batches=lambda epoch: train_loader, step=step,
        evaluate=lambda: _selector_scores(selector, approximator, data, config, device, val_loader),
        generator=generator, term_mean="sample", advice="Lower `lr`.",
    )
    start = time.perf_counter()
    run = run_epochs(stage, config.epochs, progress=scaled_progress(progress, 0.0, 1.0, "selector "), should_stop=should_stop)
    nets.load_state_dict(run.best_state)
    history = SelectorHistory(rows=run.history, best_epoch=run.best_epoch, best_val_acc=run.best_row["val_acc"], seconds=time.perf_counter() - start)
    return selector.eval(), approximator.eval(), history
