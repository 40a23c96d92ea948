"""Paper A on torchvision VGG, whose head pools to 7×7 and so runs on cached feature maps.

A tiny ImageFolder at 32 px and vgg11 with random weights (nothing is downloaded): the whole
detect pipeline runs on the map path, and the map head is checked against the full model
with the target layer's output masked by a forward hook.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cfdebug.cfe import CFEConfig, masked_head, masked_predictions, mc_heads, predict_masks
from cfdebug.cli import main
from cfdebug.config import DataConfig, ModelConfig, WorkspaceConfig
from cfdebug.detect import DetectConfig, MCFilterConfig, ablation, run_detection
from cfdebug.hooks import capture, count_hooks
from cfdebug.workspace import Workspace

CLASSES = ("red", "green", "blue")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """train/ and test/ with 8 and 4 noisy 32 px images per class, coloured by class."""
    root = tmp_path_factory.mktemp("tiny-vgg")
    rng = np.random.default_rng(0)
    for split, per in (("train", 8), ("test", 4)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per):
                img = rng.integers(0, 80, (32, 32, 3))
                img[..., c] += 150
                Image.fromarray(img.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def vgg_workspace(tiny_folder, tmp_path_factory):
    config = WorkspaceConfig(
        data=DataConfig(source=str(tiny_folder), input_size=32),
        model=ModelConfig(name="vgg11"),
        workdir=str(tmp_path_factory.mktemp("vgg-work")),
        device="cpu",
    )
    with pytest.warns(UserWarning, match="random weights"):
        return Workspace(config)


CFE = CFEConfig(epochs=2, batch_size=8)


def test_vgg_target_has_a_map_head_only(vgg_workspace):
    ws = vgg_workspace
    assert ws.target.pooled_head is None and ws.target.map_head is not None
    assert masked_head(ws.target, ws.device).kind == "map"
    maps = ws.extractions.maps("train")
    assert maps.shape == (len(ws.data.splits["train"]), 512, 2, 2)  # features.19 at 32 px


def test_vgg_map_head_is_rewritten_for_channel_masks(vgg_workspace):
    """torchvision VGG's head (max pool → 7×7 avg pool → FC layers) takes the channel-linear
    rewrite, and on the cached maps it gives the module's logits on the masked maps."""
    ws = vgg_workspace
    head = masked_head(ws.target, ws.device)
    assert head.channel_linear is not None
    x = torch.as_tensor(np.array(ws.extractions.maps("train")[:4]))
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(4, 3, x.shape[1], generator=gen) * (torch.rand(4, 3, x.shape[1], generator=gen) > 0.5)
    with torch.no_grad():
        expect = head.module((x[:, None] * m[..., None, None]).flatten(0, 1))
        torch.testing.assert_close(head(x, m), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_map_head_predictions_equal_the_masked_full_model(vgg_workspace):
    """The map head on MC-masked cached maps gives exactly what the whole VGG gives when a
    hook multiplies the target layer's output by the same masks."""
    ws = vgg_workspace
    fitted = mc_heads(ws, CFE)
    assert fitted.meta["head"] == "map" and not fitted.cache_hit
    assert len(fitted.history) == 2 and fitted.history[-1]["loss"] == fitted.history[-1]["loss"]  # finite, logged
    train = ws.extractions.get("train")
    masks = predict_masks(fitted.heads, train.features, train.preds)  # [N, C]
    head = masked_head(ws.target, ws.device)
    via_head = masked_predictions(head, ws.extractions.maps("train"), masks)

    x = torch.stack([ws.data.torch_split("train")[i][0] for i in range(len(train.labels))])
    m = torch.as_tensor(masks, dtype=torch.float32)[:, :, None, None]
    with torch.no_grad(), capture(ws.model, ws.target.name, edit=lambda name, out: out * m):
        via_model = ws.model(x).argmax(1).numpy()
    np.testing.assert_array_equal(via_head, via_model)
    assert count_hooks(ws.model) == 0
    # The cached maps are the model's own: unmasked, the head reproduces the cached logits.
    ones = np.ones_like(masks, dtype=np.float32)
    np.testing.assert_array_equal(masked_predictions(head, ws.extractions.maps("train"), ones), train.preds)
    # Masking changes some predictions (6 of 21 when measured), so the equality is not vacuous.
    assert (via_model != train.preds).any()
    assert mc_heads(ws, CFE).cache_hit


@pytest.mark.slow
def test_vgg_detection_runs_on_the_map_path(vgg_workspace):
    ws = vgg_workspace
    config = DetectConfig(filters=MCFilterConfig(tau=0.0, cfe=CFE))  # random weights are never confident
    result = run_detection(ws, config)
    n_test = len(ws.data.splits["test"])
    assert len(result["images"]) == n_test
    assert {"total_errors", "table1", "auroc", "aupr_err", "rerank_fixed", "ablation", "cfe_keep_rate"} <= set(result)
    assert [row["metric"] for row in result["table1"]] == ["avg_recall", "avg_f1", "recall_cut"]
    assert sum(result["global_filters"]["counts"]) > 0
    assert result["ablation"]["classes"]  # at least one class with a global set and test images
    # The causal check for one class goes through the cached test maps too.
    cls = result["ablation"]["classes"][0]
    one = ablation(ws, cls, top_n=5, n_random_draws=3, config=config)
    assert one["classes"] == [cls]
    assert one["per_class"][0]["filters"] == next(r for r in result["ablation"]["per_class"] if r["class"] == cls)["filters"]


@pytest.mark.slow
def test_detect_cli_on_vgg(tiny_folder, tmp_path, capsys):
    out = tmp_path / "vgg.json"
    rc = main([
        "detect", "--model", "vgg11", "--data", str(tiny_folder), "--input-size", "32", "--workdir", str(tmp_path / "w"),
        "--device", "cpu", "--quiet", "--cfe-epochs", "1", "--cfe-batch-size", "8", "--json", str(out), "--csv", str(tmp_path / "vgg.csv"),
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(out.read_text())
    assert result["config"]["filters"]["cfe"]["epochs"] == 1
    assert len(result["images"]) == 12
    assert "features.19" in captured.out
    # Random weights are never confident: every global set is empty and the CLI says so.
    assert "unscorable" in captured.err
    assert "causal check: skipped" in captured.out and result["ablation"]["mc_recall_drop"] is None
    assert (tmp_path / "vgg.csv").read_text().count("\n") == 13
