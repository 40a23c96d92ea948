"""The CFE heads' fit as a stage of the training engine.

The fit used to have its own SGD loop; it now runs on :func:`cfdebug.training.run_epochs`. The
heads it fits must be *bit-identical* to that loop's (same batch order, initialisation,
optimizer steps and float operations), so a copy of the old loop is kept here, and only here,
as the reference. The engine adds what every stage has: cancel and the non-finite check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cfdebug.cfe import CFEConfig, MaskedHead, batch_order, fit_mc_heads, fit_mi_heads, masked_predictions, mc_heads, mc_loss, mi_loss
from cfdebug.cfe import classifier_head
from cfdebug.cfe.classifier_head import frozen_head, take_rows
from cfdebug.cfe.fitting import _fit_blocks, _fit_inputs, _init_heads
from cfdebug.cfe.heads import MCHeads, MIHeads
from cfdebug.errors import CfdebugError
from cfdebug.runs import RunCancelled
from cfdebug.training import UNEVALUATED_HISTORY_KEYS

K, C, N = 3, 6, 70


def _reference_loop(heads, loss_fn, g, inputs, config, blocks) -> list[dict]:
    """The CFE fit's loop before it ran on the engine, verbatim (progress aside)."""
    opt = torch.optim.SGD(heads.parameters(), lr=config.lr, momentum=config.momentum)
    n = g.shape[0]
    batches = batch_order(n, config.batch_size, config.epochs, config.seed)
    per_epoch = math.ceil(n / config.batch_size)
    row_step, spans = blocks
    history: list[dict] = []
    sums: dict[str, float] = {}
    for step, idx in enumerate(batches):
        idx_t = torch.as_tensor(idx, device=g.device)
        g_b = g[idx_t]
        x_b = None if inputs is None else take_rows(inputs, idx, g.device)
        opt.zero_grad(set_to_none=True)
        for lo in range(0, len(idx), row_step):
            rows = slice(lo, lo + row_step)
            for span in spans:
                terms = loss_fn(idx_t[rows], g_b[rows], None if x_b is None else x_b[rows], span)
                terms["loss"].backward()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
        opt.step()
        if (step + 1) % per_epoch == 0:
            epoch = (step + 1) // per_epoch
            history.append({"epoch": epoch, **{k: v / n for k, v in sums.items()}})
            sums = {}
    return history


def _reference_fit(kind: str, features, head, config: CFEConfig, head_inputs=None):
    """``fit_mc_heads`` / ``fit_mi_heads`` as they were, on the reference loop."""
    g, frozen = _fit_inputs(features, head, head_inputs, K, "cpu")
    if kind == "mc":
        heads = _init_heads(MCHeads(K, g.shape[1], config.mask_threshold), g, config, config.seed)

        def loss_fn(idx, gb, xb, span):
            return mc_loss(heads, frozen, gb, config, xb, span)
    else:
        ones = np.ones(tuple(g.shape), dtype=np.float32)
        preds = torch.as_tensor(masked_predictions(frozen, g if head_inputs is None else head_inputs, ones))
        heads = _init_heads(MIHeads(K, g.shape[1]), g, config, config.seed + 1)

        def loss_fn(idx, gb, xb, span):
            return mi_loss(heads, frozen, gb, preds[idx], config, xb, span)

    blocks = _fit_blocks(frozen, K, min(g.shape[0], config.batch_size), g, head_inputs, additive=kind == "mi")
    return heads.eval(), _reference_loop(heads, loss_fn, g, head_inputs, config, blocks)


def _features(seed: int = 0) -> np.ndarray:
    return (torch.rand(N, C, generator=torch.Generator().manual_seed(seed)) * 2.0).numpy()


def _linear_head(seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(C, K)
    with torch.no_grad():
        head.weight.copy_(torch.randn(K, C, generator=gen))
        head.bias.copy_(torch.randn(K, generator=gen) * 0.1)
    return head


def _vgg_style_head(seed: int = 0) -> nn.Module:
    """torchvision VGG's map head in small: max pool, adaptive 3×3 avg pool, FC-ReLU-Dropout-FC."""
    torch.manual_seed(seed)
    classifier = nn.Sequential(nn.Linear(C * 9, 16), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(16, K))
    return frozen_head(nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(3), nn.Flatten(1), classifier), "cpu")


def _assert_same_heads(fitted, reference) -> None:
    for name in ("weight", "bias", "shift", "scale"):
        assert torch.equal(getattr(fitted, name), getattr(reference, name)), name


def _terms(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("best_epoch", "train_seconds")} for row in history]


@pytest.mark.parametrize("kind", ["mc", "mi"])
def test_pooled_fit_is_bit_identical_to_the_loop_it_replaced(kind):
    g, head = _features(1), _linear_head(1)
    config = CFEConfig(epochs=4, batch_size=16, seed=3)
    fit = fit_mc_heads if kind == "mc" else fit_mi_heads
    heads, history = fit(g, head, K, config)
    ref_heads, ref_history = _reference_fit(kind, g, head, config)
    _assert_same_heads(heads, ref_heads)
    assert _terms(history) == ref_history  # one block per batch: the logged means are the same floats too
    assert [r["best_epoch"] for r in history] == [1, 2, 3, 4]
    assert all(set(r) == {*UNEVALUATED_HISTORY_KEYS, *ref_history[0]} for r in history)
    assert not torch.equal(heads.weight, _init_heads(type(heads)(K, C), torch.as_tensor(g), config, config.seed + (kind == "mi")).weight)


def test_fit_in_blocks_of_heads_is_bit_identical_to_the_loop_it_replaced(monkeypatch):
    """One head per block (three backward passes per batch, the gradients accumulated)."""
    monkeypatch.setattr(classifier_head, "MAP_BLOCK_ELEMENTS", 1)
    g, head = _features(2), _linear_head(2)
    config = CFEConfig(epochs=3, batch_size=16, seed=0)
    heads, history = fit_mc_heads(g, head, K, config)
    ref_heads, ref_history = _reference_fit("mc", g, head, config)
    _assert_same_heads(heads, ref_heads)
    for row, ref in zip(_terms(history), ref_history):  # per-batch sums first: the same to rounding
        assert row == pytest.approx(ref, rel=1e-12)


def test_fit_in_blocks_of_rows_through_the_shared_products_is_bit_identical(monkeypatch):
    """VGG's map head at q = 9 (the per-channel products shared by the masks of an image), the
    rows of a batch in blocks of 5."""
    monkeypatch.setattr(classifier_head, "PRODUCT_BLOCK_ELEMENTS", 5 * C * 16)
    maps = (torch.rand(N, C, 6, 6, generator=torch.Generator().manual_seed(7)) * 2.0).numpy()
    g = maps.mean(axis=(2, 3))
    head = MaskedHead(_vgg_style_head(7), "map")
    config = CFEConfig(epochs=2, batch_size=16, seed=3)
    assert _fit_blocks(head, K, 16, torch.as_tensor(g), maps, additive=False)[0] == 5
    heads, _ = fit_mc_heads(g, head, K, config, head_inputs=maps)
    ref_heads, _ = _reference_fit("mc", g, head, config, head_inputs=maps)
    _assert_same_heads(heads, ref_heads)


def test_a_fit_can_be_cancelled_between_batches():
    polls = []

    def should_stop():
        polls.append(1)
        return len(polls) > 7  # 5 batches per epoch: stop before batch 2 of epoch 2

    with pytest.raises(RunCancelled, match="fitting the MC heads was cancelled during epoch 2"):
        fit_mc_heads(_features(), _linear_head(), K, CFEConfig(epochs=3, batch_size=16), should_stop=should_stop)
    assert len(polls) == 8


def test_a_non_finite_fit_names_its_epoch_batch_and_term():
    g = _features(3)
    config = CFEConfig(epochs=2, batch_size=16, standardise_inputs=False, seed=5)
    g[11, 2] = np.nan
    batch = next(i for i, idx in enumerate(batch_order(N, 16, 1, config.seed)) if 11 in idx)
    with pytest.raises(CfdebugError, match=rf"Fitting the MI heads diverged at epoch 1, batch {batch}: the `ce` term is nan\. .*CFE learning rate"):
        fit_mi_heads(g, _linear_head(), K, config)


def test_progress_names_the_heads_and_their_epochs():
    calls = []
    fit_mc_heads(_features(), _linear_head(), K, CFEConfig(epochs=2, batch_size=16), progress=lambda f, m: calls.append((f, m)))
    assert [f for f, _ in calls] == [0.5, 1.0]
    assert calls[0][1].startswith("MC heads epoch 1/2: loss ")


def test_cached_heads_pass_should_stop_through_and_store_nothing(demo_workspace):
    config = CFEConfig(epochs=1, seed=4321)  # a key no other test fits
    with pytest.raises(RunCancelled, match="fitting the MC heads"):
        mc_heads(demo_workspace, config, should_stop=lambda: True)
    from cfdebug.cfe.cache import CACHE_KIND, heads_key

    assert not demo_workspace.store.exists(CACHE_KIND, heads_key(demo_workspace, "mc", config))
