"""The streaming extraction pass and its cache: exact values, order, atomicity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cfdebug.extract import ExtractionCache, stream_features
from cfdebug.hooks import count_hooks
from cfdebug.models import DemoCNN

CPU = torch.device("cpu")


class HandSetCNN(nn.Module):
    """conv(3→2, 3×3, pad 1, no bias) → ReLU → GAP → linear(2→2), all weights set by hand.

    Filter 0 sums its 3×3×3 window (all ones); filter 1 is minus that, so ReLU zeroes it.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight[0].fill_(1.0)
            self.conv.weight[1].fill_(-1.0)
            self.fc.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
            self.fc.bias.copy_(torch.tensor([0.5, -1.0]))

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def _constant_images(n: int) -> torch.Tensor:
    """``[n, 3, 4, 4]``: image i is the constant i + 1."""
    return torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()


def _batches(x: torch.Tensor, order, batch_size: int):
    order = torch.as_tensor(order)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], torch.zeros(len(idx), dtype=torch.int64), idx


def test_exact_pooled_features_on_hand_set_cnn(tmp_path):
    # On a 4×4 constant image c with zero padding a 3×3 all-ones window over 3 channels sees
    # 4 pixels at a corner, 6 at an edge, 9 inside: (4·4 + 8·6 + 4·9) / 16 · 3 · c = 18.75 c.
    n = 5
    model = HandSetCNN()
    stats = stream_features(model, "relu", _batches(_constant_images(n), range(n), 2), n, tmp_path, CPU)
    feats = np.load(tmp_path / "features.npy")
    logits = np.load(tmp_path / "logits.npy")
    c = np.arange(1, n + 1, dtype=np.float32)
    expected_feats = np.stack([18.75 * c, np.zeros(n)], axis=1)
    expected_logits = np.stack([37.5 * c + 0.5, 18.75 * c - 1.0], axis=1)
    np.testing.assert_allclose(feats, expected_feats, rtol=1e-6)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-6)
    assert feats.dtype == np.float32 and logits.dtype == np.float32
    assert stats["n"] == n
    assert count_hooks(model) == 0


def test_activation_is_applied_before_pooling(tmp_path):
    # Hook the conv (before the ReLU) and pass ReLU as `activation` (DenseNet's case).
    n = 3
    stream_features(HandSetCNN(), "conv", _batches(_constant_images(n), range(n), 2), n, tmp_path, CPU, activation=torch.relu)
    feats = np.load(tmp_path / "features.npy")
    np.testing.assert_allclose(feats[:, 1], 0.0)
    np.testing.assert_allclose(feats[:, 0], 18.75 * np.arange(1, n + 1), rtol=1e-6)


def test_rows_follow_index_order_when_batches_are_shuffled(tmp_path):
    n = 7
    order = np.random.default_rng(3).permutation(n)
    assert not np.array_equal(order, np.arange(n))
    seen = []
    stream_features(
        HandSetCNN(), "relu", _batches(_constant_images(n), order, 3), n, tmp_path, CPU,
        progress=lambda frac, msg: seen.append(frac),
    )
    feats = np.load(tmp_path / "features.npy")
    np.testing.assert_allclose(feats[:, 0], 18.75 * np.arange(1, n + 1), rtol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy")[:, 0], 37.5 * np.arange(1, n + 1) + 0.5, rtol=1e-6)
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen)


def test_matches_a_naive_per_image_loop(tmp_path):
    torch.manual_seed(0)
    model = DemoCNN(num_classes=4, width=4).eval()
    # give BatchNorm non-trivial statistics so eval mode matters
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(10, 3, 16, 16)
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(10, dtype=torch.int64), torch.arange(10))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    x_before = x.clone()
    stream_features(model, "features.19", loader, len(x), tmp_path, CPU)
    torch.testing.assert_close(x, x_before)  # inputs untouched

    naive_feats, naive_logits = [], []
    with torch.no_grad():
        for i in range(len(x)):
            fmap = model.features(x[i : i + 1])  # [1, 16, 4, 4]
            naive_feats.append(fmap.mean(dim=(2, 3))[0])
            naive_logits.append(model(x[i : i + 1])[0])
    np.testing.assert_allclose(np.load(tmp_path / "features.npy"), torch.stack(naive_feats).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), torch.stack(naive_logits).numpy(), rtol=1e-5, atol=1e-6)


def test_extraction_cache_hit_gives_identical_arrays(demo_workspace):
    ws = demo_workspace
    first = ws.extractions.get("val")
    second = ws.extractions.get("val")
    assert second.cache_hit
    n = len(ws.data.splits["val"])
    assert first.features.shape == (n, ws.target.channels) == (n, 64)
    assert first.logits.shape == (n, ws.data.num_classes)
    for name in ("features", "logits", "labels", "ids"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    np.testing.assert_array_equal(second.labels, ws.data.splits["val"].labels)
    assert list(second.ids) == list(ws.data.splits["val"].ids)
    assert second.meta["split"] == "val"
    assert second.meta["key_parts"] == ws.key_parts
    assert first.accuracy > 0.5  # the demo model learned something
    assert count_hooks(ws.model) == 0


def test_failed_extraction_leaves_nothing_behind(demo_workspace, monkeypatch):
    ws = demo_workspace
    cache = ExtractionCache(ws)
    key = "failing-extraction-test"
    monkeypatch.setattr(cache, "key", lambda split: key)
    calls = {"n": 0}
    original = DemoCNN.forward

    def failing_forward(self, x):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise RuntimeError("simulated crash mid-extraction")
        return original(self, x)

    monkeypatch.setattr(DemoCNN, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="mid-extraction"):
        cache.get("train")  # train has > 2 batches of 128
    assert calls["n"] == 3
    kind_dir = ws.store.root / "objects" / ExtractionCache.KIND
    assert not ws.store.exists(ExtractionCache.KIND, key)
    assert not ws.store.path(ExtractionCache.KIND, key).exists()
    assert not list(kind_dir.glob(".tmp-*"))
    assert count_hooks(ws.model) == 0


def test_keep_maps_writes_the_raw_target_output(tmp_path):
    # Hook the conv with ReLU as `activation`: maps.npy holds the conv output itself (filter 1
    # negative), features.npy its ReLU'd pool, exactly as without maps.
    n = 4
    x = _constant_images(n)
    stream_features(HandSetCNN(), "conv", _batches(x, [2, 0, 3, 1], 3), n, tmp_path, CPU, activation=torch.relu, keep_maps=True)
    maps = np.load(tmp_path / "maps.npy")
    assert maps.shape == (n, 2, 4, 4) and maps.dtype == np.float32
    with torch.no_grad():
        expected = HandSetCNN().conv(x).numpy()
    np.testing.assert_allclose(maps, expected, rtol=1e-6)
    assert (maps[:, 1] < 0).all()
    np.testing.assert_allclose(np.load(tmp_path / "features.npy")[:, 0], 18.75 * np.arange(1, n + 1), rtol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "features.npy")[:, 1], 0.0)


def test_rows_never_written_raise(tmp_path):
    from cfdebug.errors import CfdebugError

    with pytest.raises(CfdebugError, match="2 rows were never written"):
        stream_features(HandSetCNN(), "relu", _batches(_constant_images(5), range(3), 2), 5, tmp_path, CPU)


def test_demo_feature_maps_are_cached_and_pool_to_the_features(demo_workspace, monkeypatch):
    ws = demo_workspace
    maps = ws.extractions.maps("val")
    n = len(ws.data.splits["val"])
    assert maps.shape == (n, 64, 8, 8) and maps.dtype == np.float32 and not maps.flags.writeable
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), ws.extractions.get("val").features, rtol=1e-5, atol=1e-6)

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a cached artifact")

    monkeypatch.setattr("cfdebug.extract.stream_features", boom)
    np.testing.assert_array_equal(ws.extractions.maps("val"), maps)


def test_feature_maps_that_do_not_fit_on_disk_are_refused(demo_workspace, monkeypatch):
    import shutil

    from cfdebug.errors import CfdebugError

    ws = demo_workspace
    kind_dir = ws.store.root / "objects" / ExtractionCache.MAPS_KIND
    before = sorted(kind_dir.glob("*")) if kind_dir.exists() else []
    usage = shutil.disk_usage(ws.store.root)
    monkeypatch.setattr("cfdebug.extract.shutil.disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(CfdebugError, match=r"feature maps \(1078, 64, 8, 8\) needs \d+\.\d MiB, but only 1000 B are free"):
        ws.extractions.maps("train")
    assert sorted(kind_dir.glob("*")) == before  # nothing half-written, no temporary folder left
    assert count_hooks(ws.model) == 0
