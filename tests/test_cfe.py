"""CFE heads: the batched module against a naive per-class loop, loss terms, masks, the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfdebug.cfe import (
    CFEConfig,
    MCHeads,
    MIHeads,
    alter_rate,
    batch_order,
    fit_mc_heads,
    fit_mi_heads,
    frozen_head,
    MaskedHead,
    class_spans,
    keep_rate,
    masked_predictions,
    mc_heads,
    mc_loss,
    predict_masks,
    second_most_probable,
    thresholded_relu,
)
from cfdebug.errors import CfdebugError
from cfdebug.training import UNEVALUATED_HISTORY_KEYS

K, C, N = 3, 6, 70


def _toy(seed: int = 0):
    """Non-negative features [N, C] (like pooled ReLU maps) and a fixed linear head C → K."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(N, C, generator=gen) * 2.0
    head = nn.Linear(C, K)
    with torch.no_grad():
        head.weight.copy_(torch.randn(K, C, generator=gen))
        head.bias.copy_(torch.randn(K, generator=gen) * 0.1)
    return g.numpy(), head


def test_thresholded_relu_values_and_gradient():
    x = torch.tensor([0.2, 0.5, 0.51, 0.9], requires_grad=True)
    y = thresholded_relu(x, 0.5)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.51, 0.9])
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0]


def _naive_layer(init, k: int, config: CFEConfig):
    """Head ``k`` of ``init`` as its own ``nn.Linear`` with its own SGD."""
    layer = nn.Linear(C, C)
    with torch.no_grad():
        layer.weight.copy_(init.weight[k])
        layer.bias.copy_(init.bias[k])
    return layer, torch.optim.SGD(layer.parameters(), lr=config.lr, momentum=config.momentum)


def _naive_mc_fit(g: np.ndarray, head: nn.Module, config: CFEConfig, maps=None) -> list[nn.Linear]:
    """The reference: K separate Dense layers, each with its own SGD, same init and batches.

    With ``maps`` [N, C, h, w] the frozen head runs on the masked maps (a map head)."""
    init = MCHeads(K, C)
    init.reset_parameters(config.seed)
    x = torch.as_tensor(g)
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    layers, opts = zip(*[_naive_layer(init, k, config) for k in range(K)])
    frozen = frozen_head(head, "cpu")
    _naive_mc_steps(x, mu, sd, layers, opts, frozen, config, None if maps is None else torch.as_tensor(np.array(maps)))
    return list(layers)


def _naive_mc_steps(x, mu, sd, layers, opts, frozen, config, maps=None):
    for idx in batch_order(N, config.batch_size, config.epochs, config.seed):
        gb = x[torch.as_tensor(idx)]
        for k in range(K):
            s = torch.sigmoid(layers[k]((gb - mu) / sd))
            m = torch.where(s > config.mask_threshold, s, torch.zeros_like(s))
            z = frozen(gb * m) if maps is None else frozen(maps[torch.as_tensor(idx)] * m[:, :, None, None])
            target = torch.full((gb.shape[0],), k)
            loss = (
                F.cross_entropy(z, target, reduction="sum")
                + config.sparsity_lambda * config.sparsity_scale * m.abs().sum()
                - config.logits_weight * z[:, k].sum()
            )
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()


def test_batched_mc_heads_match_naive_per_class_loop():
    g, head = _toy()
    config = CFEConfig(epochs=4, batch_size=16, seed=3)
    heads, history = fit_mc_heads(g, head, K, config)
    layers = _naive_mc_fit(g, head, config)
    for k, layer in enumerate(layers):
        torch.testing.assert_close(heads.weight[k].detach(), layer.weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(heads.bias[k].detach(), layer.bias.detach(), atol=1e-5, rtol=1e-4)
    # The same masks, whichever way they are asked for.
    x = torch.as_tensor(g)
    naive = np.stack([(layers[k]((x - x.mean(0)) / x.std(0, unbiased=False)) > 0).detach().numpy() for k in range(K)], axis=1)
    all_masks = predict_masks(heads, g)
    assert all_masks.shape == (N, K, C)
    assert (all_masks == naive).mean() > 0.999  # a pre-activation within 1e-5 of 0 may flip
    assert len(history) == 4 and set(history[0]) == {*UNEVALUATED_HISTORY_KEYS, "ce", "sparsity", "logits"}
    # Training moved the weights (the comparison is not between two untouched inits).
    init = MCHeads(K, C)
    init.reset_parameters(3)
    assert not torch.allclose(init.weight, heads.weight.detach())


def test_batched_mi_heads_match_naive_per_class_loop():
    g, head = _toy(1)
    config = CFEConfig(epochs=3, batch_size=16, seed=0)
    heads, _ = fit_mi_heads(g, head, K, config)
    init = MIHeads(K, C)
    init.reset_parameters(config.seed + 1)
    x = torch.as_tensor(g)
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    frozen = frozen_head(head, "cpu")
    preds = frozen(x).argmax(1)
    for k in range(K):
        layer, opt = _naive_layer(init, k, config)
        _naive_mi_steps(x, mu, sd, layer, opt, frozen, preds, k, config)
        torch.testing.assert_close(heads.weight[k].detach(), layer.weight.detach(), atol=1e-5, rtol=1e-4)


def _naive_mi_steps(x, mu, sd, layer, opt, frozen, preds, k, config):
    for idx in batch_order(N, config.batch_size, config.epochs, config.seed):
        idx = torch.as_tensor(idx)
        keep = (preds[idx] != k).float()  # images already predicted k are left out
        m = F.relu(layer((x[idx] - mu) / sd))
        z = frozen(x[idx] + m)
        ce = F.cross_entropy(z, torch.full((len(idx),), k), reduction="none")
        loss = (ce * keep).sum() + config.mi_sparsity * (m.abs().sum(1) * keep).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_mc_loss_terms_by_hand():
    """Head 0 keeps filter 0 only, head 1 keeps both (sigmoid(±20) saturates to 1 and 0)."""
    heads = MCHeads(2, 2)
    with torch.no_grad():
        heads.weight.zero_()
        heads.bias.copy_(torch.tensor([[20.0, -20.0], [20.0, 20.0]]))
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    g = torch.tensor([[1.0, 2.0]])
    config = CFEConfig()
    with torch.no_grad():
        terms = mc_loss(heads, head, g, config)
    m = torch.sigmoid(torch.tensor(20.0))
    z0 = torch.tensor([1.0 * m, 0.0])  # head 0: g ⊙ [m, 0]
    z1 = torch.tensor([1.0 * m, 2.0 * m])  # head 1: g ⊙ [m, m]
    ce = -torch.log_softmax(z0, 0)[0] - torch.log_softmax(z1, 0)[1]
    assert float(terms["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(terms["sparsity"]) == pytest.approx(2 * 1e-3 * 3 * float(m), rel=1e-5)
    assert float(terms["logits"]) == pytest.approx(-1e-3 * float(z0[0] + z1[1]), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"] + terms["sparsity"] + terms["logits"]), rel=1e-6)


def test_predict_masks_shapes_agree():
    g, head = _toy(2)
    heads, _ = fit_mc_heads(g, head, K, CFEConfig(epochs=1, batch_size=32))
    every = predict_masks(heads, g)  # [N, K, C]
    cls = np.arange(N) % K
    one = predict_masks(heads, g, cls)  # [N, C]
    top = np.stack([cls, (cls + 1) % K], axis=1)
    two = predict_masks(heads, g, top)  # [N, 2, C]
    assert one.dtype == bool and one.shape == (N, C) and two.shape == (N, 2, C)
    np.testing.assert_array_equal(one, every[np.arange(N), cls])
    np.testing.assert_array_equal(two[:, 1], every[np.arange(N), (cls + 1) % K])
    with pytest.raises(CfdebugError, match="classes"):
        predict_masks(heads, g, np.full(N, K))


def test_fitting_leaves_inputs_alone():
    g, head = _toy(3)
    g_before = g.copy()
    w_before = head.weight.detach().clone()
    fit_mc_heads(g, head, K, CFEConfig(epochs=1))
    np.testing.assert_array_equal(g, g_before)
    assert torch.equal(head.weight, w_before) and head.weight.requires_grad and head.weight.grad is None


@pytest.mark.slow  # 30 epochs of MI heads
def test_mi_heads_reach_the_alter_class():
    g, head = _toy(4)
    heads, _ = fit_mi_heads(g, head, K, CFEConfig(epochs=30, batch_size=16))
    logits = head(torch.as_tensor(g)).detach().numpy()
    alter = second_most_probable(logits)
    assert (alter != logits.argmax(1)).all()
    assert alter_rate(heads, frozen_head(head, "cpu"), g, alter) > 0.8


@pytest.mark.parametrize(
    "kwargs",
    [{"epochs": 0}, {"batch_size": -1}, {"lr": 0.0}, {"momentum": 1.0}, {"mask_threshold": 1.5}, {"sparsity_lambda": -1.0}, {"epochs": 2.5}],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(CfdebugError, match="Expected"):
        CFEConfig(**kwargs)


def test_target_without_any_head_is_refused():
    g, _ = _toy()
    with pytest.raises(CfdebugError, match="--layer"):
        fit_mc_heads(g, None, K)


# ---------------------------------------------------------------- heads on feature maps (VGG-style)

H = W = 3


def _toy_maps(seed: int = 0, tmp_path=None):
    """Non-negative maps [N, C, H, W] (a memmap when ``tmp_path`` is given), their GAP g [N, C]."""
    gen = torch.Generator().manual_seed(seed)
    a = (torch.rand(N, C, H, W, generator=gen) * 2.0).numpy()
    if tmp_path is not None:
        np.save(tmp_path / "maps.npy", a)
        a = np.load(tmp_path / "maps.npy", mmap_mode="r")
    return np.asarray(a).mean(axis=(2, 3)).astype(np.float32), a


def _flat_head(seed: int = 0) -> nn.Module:
    """A head that sees every position (like VGG's FC layers), so GAP(m ⊙ A) says nothing."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.Flatten(1), nn.Linear(C * H * W, K))
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(K, C * H * W, generator=gen) * 0.3)
        head[1].bias.zero_()
    return head


def test_class_spans_cover_every_head_within_the_budget():
    assert class_spans(10, 4, 100, budget=800) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert class_spans(3, 4, 100, budget=10) == [(0, 1), (1, 2), (2, 3)]  # at least one head
    assert class_spans(3, 4, 100, budget=10**9) == [(0, 3)]


@pytest.mark.parametrize("budget", [None, 1])  # 1: one head per block, gradients accumulated
def test_map_head_equals_pooled_head_when_the_map_head_is_gap_then_linear(tmp_path, monkeypatch, budget):
    """GAP then linear on ``m ⊙ A`` is the linear head on ``m ⊙ g``: both paths must train the
    same heads and give the same keep rate, alter rate, global filters and ablation."""
    from cfdebug.cfe import classifier_head
    from cfdebug.detect import ablation_arrays
    from cfdebug.mcfilters import accumulate_global_filters
    from cfdebug.models import _PooledThen

    if budget is not None:
        monkeypatch.setattr(classifier_head, "MAP_BLOCK_ELEMENTS", budget)
    g, maps = _toy_maps(5, tmp_path)
    _, linear = _toy(5)
    map_head = MaskedHead(_PooledThen(linear), "map")
    config = CFEConfig(epochs=3, batch_size=16, seed=1)
    pooled, h_pooled = fit_mc_heads(g, linear, K, config)
    mapped, h_mapped = fit_mc_heads(g, map_head, K, config, head_inputs=maps)
    torch.testing.assert_close(mapped.weight, pooled.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mapped.bias, pooled.bias, atol=1e-5, rtol=1e-4)
    assert [round(e["loss"], 4) for e in h_mapped] == [round(e["loss"], 4) for e in h_pooled]
    mi_p, _ = fit_mi_heads(g, linear, K, config)
    mi_m, _ = fit_mi_heads(g, map_head, K, config, head_inputs=maps)
    torch.testing.assert_close(mi_m.weight, mi_p.weight, atol=1e-5, rtol=1e-4)

    frozen = frozen_head(linear, "cpu")
    preds = frozen(torch.as_tensor(g)).argmax(1).numpy()
    labels = preds.copy()
    labels[:10] = (labels[:10] + 1) % K  # some errors
    kp = keep_rate(pooled, frozen, g, labels, preds, K)
    km = keep_rate(pooled, map_head, g, labels, preds, K, head_inputs=maps)
    np.testing.assert_array_equal(km["keep_rate"], kp["keep_rate"])
    alter = (preds + 1) % K
    assert alter_rate(mi_p, map_head, g, alter, head_inputs=maps) == alter_rate(mi_p, frozen, g, alter)
    probs = torch.softmax(frozen(torch.as_tensor(g)), 1).detach().numpy()
    gp = accumulate_global_filters(pooled, frozen, g, labels, probs, tau=0.0)
    gm = accumulate_global_filters(pooled, map_head, g, labels, probs, tau=0.0, head_inputs=maps)
    np.testing.assert_array_equal(gm.histogram, gp.histogram)
    np.testing.assert_allclose(gm.magnitude, gp.magnitude)
    assert gp.counts.sum() > 0
    ap = ablation_arrays(frozen, gp, g, labels, cls=None, top_n=2, n_random_draws=4)
    am = ablation_arrays(map_head, gm, g, labels, cls=None, top_n=2, n_random_draws=4, head_inputs=maps)
    assert am["mc_recall_drop"] == pytest.approx(ap["mc_recall_drop"]) and am["random_recall_drop"] == pytest.approx(ap["random_recall_drop"])


def test_map_heads_match_naive_per_class_loop_on_a_position_dependent_head(tmp_path, monkeypatch):
    """The batched map path (one head per block here) against K separate Dense layers, each
    masking the feature maps channel-wise and running the frozen head itself."""
    from cfdebug.cfe import classifier_head

    monkeypatch.setattr(classifier_head, "MAP_BLOCK_ELEMENTS", 1)
    g, maps = _toy_maps(6, tmp_path)
    head = _flat_head(6)
    config = CFEConfig(epochs=3, batch_size=16, seed=2)
    heads, _ = fit_mc_heads(g, MaskedHead(head, "map"), K, config, head_inputs=maps)

    layers = _naive_mc_fit(g, head, config, maps)
    for k, layer in enumerate(layers):
        torch.testing.assert_close(heads.weight[k].detach(), layer.weight.detach(), atol=1e-5, rtol=1e-4)
    init = MCHeads(K, C)
    init.reset_parameters(config.seed)
    assert not torch.allclose(init.weight, heads.weight.detach())
    a, frozen = torch.as_tensor(np.array(maps)), frozen_head(head, "cpu")
    # Masked predictions on maps: the masked map through the head, row by row.
    masks = predict_masks(heads, g, np.arange(N) % K)
    expect = frozen(a * torch.as_tensor(masks, dtype=torch.float32)[:, :, None, None]).argmax(1).numpy()
    np.testing.assert_array_equal(masked_predictions(MaskedHead(frozen, "map"), maps, masks), expect)


def test_map_head_without_maps_is_refused():
    g, maps = _toy_maps()
    with pytest.raises(CfdebugError, match=r"feature maps \[N, C, h, w\]"):
        fit_mc_heads(g, MaskedHead(_flat_head(), "map"), K)
    with pytest.raises(CfdebugError, match="shape"):
        fit_mc_heads(g, MaskedHead(_flat_head(), "map"), K, head_inputs=maps[:5])


def test_head_for_another_class_count_is_refused():
    g, head = _toy()
    with pytest.raises(CfdebugError, match=r"\[B, 5\]"):
        fit_mc_heads(g, head, 5)


def test_demo_mc_heads_keep_rate_and_cache(demo_workspace):
    fitted = mc_heads(demo_workspace)
    k, c = demo_workspace.data.num_classes, demo_workspace.target.channels
    assert fitted.heads.weight.shape == (k, c, c)
    # Measured on the demo: 1.000 overall and per class, ~22 of 64 filters per image.
    assert fitted.meta["keep_rate_overall"] >= 0.95
    assert np.nanmin(fitted.stats["keep_rate"]) >= 0.9
    assert 1 <= fitted.meta["mean_mc_filters_overall"] < c
    again = mc_heads(demo_workspace)
    assert again.cache_hit and again.key == fitted.key
    torch.testing.assert_close(again.heads.weight, fitted.heads.weight)
    train = demo_workspace.extractions.get("train")
    direct = keep_rate(again.heads, frozen_head(demo_workspace.target.pooled_head, "cpu"), train.features, train.labels, train.preds, k)
    assert direct["overall"] == pytest.approx(fitted.meta["keep_rate_overall"])


# ---------------------------------------------------------------- the channel-linear rewrite (VGG's map head)


class _Opaque(nn.Module):
    """The same head behind a module the rewrite does not recognise: the reference map path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _vgg_style_head(seed: int = 0) -> nn.Module:
    """torchvision VGG's map head in small: max pool, adaptive 3×3 avg pool, FC-ReLU-Dropout-FC."""
    torch.manual_seed(seed)
    classifier = nn.Sequential(nn.Linear(C * 9, 16), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(16, K))
    return frozen_head(nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(3), nn.Flatten(1), classifier), "cpu")


@pytest.mark.parametrize("side", [2, 4, 6])  # 1×1 after the max pool (VGG at 32 px), 2×2, 3×3 (no pooling matrix)
def test_channel_linear_head_equals_the_module_on_masked_maps(side):
    head = _vgg_style_head()
    fast = MaskedHead(head, "map")
    assert fast.channel_linear is not None and MaskedHead(_Opaque(head), "map").channel_linear is None
    gen = torch.Generator().manual_seed(side)
    x = torch.rand(5, C, side, side, generator=gen) * 2.0
    m = torch.rand(5, 4, C, generator=gen) * (torch.rand(5, 4, C, generator=gen) > 0.4)  # [B, J, C], some zeros
    expect = head((x[:, None] * m[..., None, None]).flatten(0, 1))
    torch.testing.assert_close(fast(x, m), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(x, m[:, 0]), head(x * m[:, 0, :, None, None]), atol=1e-5, rtol=1e-5)
    # Where the rewrite does not hold, the module itself runs: negative masks (through the max
    # pool), the additive MI edit, a head in training mode (dropout).
    neg = m - 0.5
    assert torch.equal(fast(x, neg), head((x[:, None] * neg[..., None, None]).flatten(0, 1)))
    assert torch.equal(fast(x, m, additive=True), head((x[:, None] + m[..., None, None]).flatten(0, 1)))
    fast.train()
    torch.manual_seed(0)
    dropped = fast(x, m)
    torch.manual_seed(0)
    assert torch.equal(dropped, head((x[:, None] * m[..., None, None]).flatten(0, 1)))
    fast.eval()


@pytest.mark.parametrize("rows_per_block", [None, 2])  # 2: the products in blocks of two rows
def test_shared_products_equal_the_module_and_the_per_mask_route(monkeypatch, rows_per_block):
    """With q > 1 (a 6×6 map: 3×3 after the max pool, q = 9) the J masks of an image share the
    per-channel products; that equals the module on m ⊙ A and the route that runs W_eff per mask
    (one mask per image), within 1e-5."""
    from cfdebug.cfe import classifier_head

    if rows_per_block is not None:
        monkeypatch.setattr(classifier_head, "PRODUCT_BLOCK_ELEMENTS", rows_per_block * C * 16)  # 16: the head's first-layer width
    head = _vgg_style_head(3)
    fast = MaskedHead(head, "map")
    calls = []
    shared = classifier_head.ChannelLinearHead._shared_first_layer
    monkeypatch.setattr(classifier_head.ChannelLinearHead, "_shared_first_layer", lambda self, *a: calls.append(1) or shared(self, *a))
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(5, C, 6, 6, generator=gen) * 2.0
    m = torch.rand(5, K, C, generator=gen) * (torch.rand(5, K, C, generator=gen) > 0.4)
    z = fast(x, m)
    assert calls, "the shared route was not taken"
    torch.testing.assert_close(z, head((x[:, None] * m[..., None, None]).flatten(0, 1)), atol=1e-5, rtol=1e-5)
    per_mask = torch.stack([fast(x, m[:, j]) for j in range(K)], 1).flatten(0, 1)  # J = 1: W_eff per mask
    assert len(calls) == 1
    torch.testing.assert_close(z, per_mask, atol=1e-5, rtol=1e-5)
    # The gradient w.r.t. the masks (what trains the MC heads) agrees too. Where m = 0 the max
    # pool of the all-zero window breaks ties on its first position and the module's gradient
    # is a different subgradient (no matter for the heads: the thresholded ReLU passes no
    # gradient there), so this compares positive masks.
    mg, mr = (m + 0.1).requires_grad_(True), (m + 0.1).requires_grad_(True)
    fast(x, mg).square().sum().backward()
    head((x[:, None] * mr[..., None, None]).flatten(0, 1)).square().sum().backward()
    torch.testing.assert_close(mg.grad, mr.grad, atol=1e-4, rtol=1e-4)


def test_shared_products_route_is_chosen_by_cost():
    from cfdebug.cfe import ChannelLinearHead

    assert not ChannelLinearHead.shares_products(1, 200)  # VGG at 32 px: W_eff is already C wide
    assert not ChannelLinearHead.shares_products(49, 1)  # one mask per image: nothing to share
    assert not ChannelLinearHead.shares_products(2, 2)  # a tie
    assert ChannelLinearHead.shares_products(49, 2) and ChannelLinearHead.shares_products(4, 3)


@pytest.mark.parametrize("side, rows_per_block", [(2, None), (6, None), (6, 5)])
def test_channel_linear_fit_equals_the_reference_map_path(monkeypatch, side, rows_per_block):
    """The MC heads trained through the rewrite against the module on m ⊙ A: same weights to
    float rounding, the same binary masks and keep rate. Side 2: q = 1 (VGG at 32 px); side 6:
    q = 9, the shared products, in one block of rows or in blocks of 5 rows (gradients summed)."""
    from cfdebug.cfe import classifier_head, fitting

    if rows_per_block is not None:
        monkeypatch.setattr(classifier_head, "PRODUCT_BLOCK_ELEMENTS", rows_per_block * C * 16)
    gen = torch.Generator().manual_seed(7)
    maps = (torch.rand(N, C, side, side, generator=gen) * 2.0).numpy()
    g = maps.mean(axis=(2, 3))
    head = _vgg_style_head(7)
    config = CFEConfig(epochs=4, batch_size=16, seed=3)
    row_step, spans = fitting._fit_blocks(MaskedHead(head, "map"), K, 16, torch.as_tensor(g), maps, additive=False)
    assert (row_step, spans) == ((16 if rows_per_block is None else rows_per_block, [(0, K)]) if side == 6 else (16, [(0, K)]))
    fast, h_fast = fit_mc_heads(g, MaskedHead(head, "map"), K, config, head_inputs=maps)
    ref, h_ref = fit_mc_heads(g, MaskedHead(_Opaque(head), "map"), K, config, head_inputs=maps)
    torch.testing.assert_close(fast.weight, ref.weight, atol=1e-5, rtol=1e-4)
    assert [round(e["loss"], 4) for e in h_fast] == [round(e["loss"], 4) for e in h_ref]
    np.testing.assert_array_equal(predict_masks(fast, g), predict_masks(ref, g))
    preds = head(torch.as_tensor(maps)).argmax(1).numpy()
    labels = preds.copy()
    labels[:10] = (labels[:10] + 1) % K
    kf = keep_rate(fast, MaskedHead(head, "map"), g, labels, preds, K, head_inputs=maps)
    kr = keep_rate(ref, MaskedHead(_Opaque(head), "map"), g, labels, preds, K, head_inputs=maps)
    np.testing.assert_array_equal(kf["keep_rate"], kr["keep_rate"])
    assert kf["overall_mean_mc_filters"] == kr["overall_mean_mc_filters"]
