"""Tests for cfdebug.treatment: the eq. 8 loss, the fine-tuning loop, resume, control, sweep.

The loops run on a small subset of the demo workspace (the trained demo CNN on Biased Digits)
with 1–3 epochs, so the whole file stays fast on two CPU cores.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cfdebug.treatment as treatment
from cfdebug.errors import CfdebugError
from cfdebug.hooks import capture, count_hooks
from cfdebug.metrics import prediction_churn
from cfdebug.models import build_model, resolve_target
from cfdebug.runs import RunCancelled, RunRegistry
from cfdebug.training import cross_entropy_loss, finetune, loader, trainable_modules
from cfdebug.treatment import (
    FinetuneConfig,
    TreatmentConfig,
    TreatmentSchedule,
    check_global_sets,
    control_config,
    run_treatment,
    table3,
    thresholded_relu,
    treatment_loss,
    treatment_sweep,
)

CFG = TreatmentConfig(epochs=3, batch_size=32)
REPO_ROOT = Path(__file__).resolve().parents[1]
FROZEN_PREFIXES = tuple(f"features.{i}." for i in range(17))


def _timing_free(history):
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in history]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ---------------------------------------------------------------------------------- fixtures
def small_workspace(ws) -> SimpleNamespace:
    """``ws`` restricted to 160 train / 60 val / 80 test images (seeded; a plain function so the
    SIGKILL child process builds the very same one)."""
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 160), ("val", 60), ("test", 80)):
        split = ws.data.splits[name]
        splits[name] = split.subset(np.sort(rng.choice(len(split), size=n, replace=False)))
    data = dataclasses.replace(ws.data, splits=splits)
    return SimpleNamespace(model=ws.model, data=data, device=ws.device, target=ws.target, model_digest=ws.model_digest)


def top_quartile_sets(ws) -> np.ndarray:
    """Per class, the filters whose mean pooled activation over its training images is in the top 25%."""
    feats, labels = [], []
    with torch.no_grad(), capture(ws.model, ws.target.name, reduce=lambda t: t.mean(dim=(2, 3))) as cap:
        for x, y, _ in loader(ws.data, "train", 256):
            ws.model(x)
            feats.append(cap.activations[ws.target.name])
            labels.append(y)
    g, y = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    means = np.stack([g[y == c].mean(0) for c in range(ws.data.num_classes)])  # [K, C]
    return means >= np.quantile(means, 0.75, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def small_ws(demo_workspace):
    return small_workspace(demo_workspace)


@pytest.fixture(scope="module")
def global_sets(small_ws):
    return top_quartile_sets(small_ws)


@pytest.fixture(scope="module")
def reference(small_ws, global_sets, tmp_path_factory):
    """One uninterrupted 3-epoch treatment run with checkpoints, and the base weights before it."""
    before = {k: v.detach().clone() for k, v in small_ws.model.state_dict().items()}
    run_dir = tmp_path_factory.mktemp("treat-reference")
    out = run_treatment(small_ws, CFG, global_sets, run_dir=run_dir)
    return SimpleNamespace(out=out, run_dir=run_dir, before=before)


# ---------------------------------------------------------------------------------- the loss
def test_thresholded_relu_values_and_gradient():
    x = torch.tensor([-1.0, 0.2, 0.5, 0.5001, 0.9, 2.0], requires_grad=True)
    y = thresholded_relu(x, 0.5)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.0, 0.0, 0.5001, 0.9, 2.0]))
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))


def test_treatment_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    pooled = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.1, 3.0]])
    sets = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    lam1, lam2 = 0.1, 0.2
    out = treatment_loss(logits, labels, pooled, sets, lam1, lam2)

    def sig(v):
        return 1.0 / (1.0 + math.exp(-v))

    ce = (-(2.0 - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))) - (0.0 - math.log(math.exp(0.5) + math.exp(1.5) + 1.0))) / 2
    # f: sigmoid(0) = 0.5 is not > 0.5 → 0; sigmoid(-1) → 0; the other four pass.
    mc = sig(2.0) + sig(0.1) + sig(3.0)  # in G_y: sample 0 filters 0, 1; sample 1 filters 1, 2
    non_mc = sig(1.0)  # sample 0 filter 2 is below θ; sample 1 filter 0
    assert out.keys() == {"loss", "ce", "mc", "non_mc", "w_mc", "w_non_mc", "share_mc", "share_non_mc"}
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["mc"].item() == pytest.approx(mc, rel=1e-6)
    assert out["non_mc"].item() == pytest.approx(non_mc, rel=1e-6)
    assert out["loss"].item() == pytest.approx(ce - lam1 * mc + lam2 * non_mc, rel=1e-6)
    # the weighted terms and their shares of the loss (what a history row shows a person)
    assert out["w_mc"].item() == pytest.approx(-lam1 * mc, rel=1e-6) and out["w_non_mc"].item() == pytest.approx(lam2 * non_mc, rel=1e-6)
    scale = ce + lam1 * mc + lam2 * non_mc
    assert out["share_mc"].item() == pytest.approx(lam1 * mc / scale, rel=1e-6)
    assert out["share_non_mc"].item() == pytest.approx(lam2 * non_mc / scale, rel=1e-6)


def test_mc_term_gradient_raises_active_mc_preactivations():
    torch.manual_seed(0)
    pooled0 = torch.randn(8, 6)
    sets = torch.rand(8, 6) > 0.5
    weight = torch.randn(6, 4)
    labels = torch.randint(0, 4, (8,))

    def step(lam1, lam2):
        pooled = pooled0.clone().requires_grad_(True)
        treatment_loss(pooled @ weight, labels, pooled, sets, lam1, lam2)["loss"].backward()
        return (pooled - 0.1 * pooled.grad).detach()

    plain, mc, non_mc = step(0.0, 0.0), step(0.5, 0.0), step(0.0, 0.5)
    active = torch.sigmoid(pooled0) > 0.5
    assert (active & sets).any() and (active & ~sets).any() and (~active).any()
    assert torch.all(mc[active & sets] > plain[active & sets])  # MC filters pushed up
    assert torch.equal(mc[~(active & sets)], plain[~(active & sets)])
    assert torch.all(non_mc[active & ~sets] < plain[active & ~sets])  # non-MC filters pushed down
    assert torch.equal(non_mc[~(active & ~sets)], plain[~(active & ~sets)])


def test_one_step_on_the_demo_model_raises_mc_activations(small_ws, global_sets):
    ws = small_ws
    x, y, _ = next(iter(loader(ws.data, "train", 32)))
    rows = torch.from_numpy(global_sets)[y]

    def pooled_after_step(lam1):
        model = copy.deepcopy(ws.model)
        params = [p for n, p in model.named_parameters() if n.startswith(("features.17", "features.18", "classifier"))]
        opt = torch.optim.SGD(params, lr=0.05)
        with capture(model, ws.target.name, detach=False) as cap:
            logits = model(x)
            g = cap.activations[ws.target.name].mean(dim=(2, 3))
            treatment_loss(logits, y, g, rows, lam1, 0.0)["loss"].backward()
            opt.step()
            with torch.no_grad():
                model(x)
                return g.detach(), cap.activations[ws.target.name].mean(dim=(2, 3))

    g0, plain = pooled_after_step(0.0)
    _, treated = pooled_after_step(1.0)
    active_mc = (torch.sigmoid(g0) > 0.5) & rows
    assert (treated - plain)[active_mc].mean() > 0


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(CfdebugError, match="global_sets_rows"):
        treatment_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2, 5), 0.1, 0.1)


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lambda1": 3}, "Expected `lambda1` to be in [0, 1], but got 3."),
        ({"lambda2": -1e-5}, "Expected `lambda2` to be in [0, 1], but got -1e-05."),
        ({"lambda1": float("nan")}, "Expected `lambda1` to be in [0, 1]"),
        ({"epochs": 0}, "Expected `epochs` to be a positive integer, but got 0."),
        ({"lr": 0.0}, "Expected `lr` to be a positive number, but got 0.0."),
        ({"lr": -1e-4}, "Expected `lr` to be a positive number"),
        ({"trainable": "body"}, "Expected `trainable` to be one of block+head, head, all"),
        ({"dropout": 1.0}, "Expected `dropout` to be in [0, 1)"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(CfdebugError) as info:
        TreatmentConfig(**kwargs)
    assert message in str(info.value)


def test_finetune_config_validation():
    with pytest.raises(CfdebugError, match="`optimizer`"):
        FinetuneConfig(optimizer="rmsprop")
    with pytest.raises(CfdebugError, match="`epochs`"):
        FinetuneConfig(epochs=-2)


def test_global_sets_validation(small_ws):
    with pytest.raises(CfdebugError, match=r"shape \[K, C\] = \[10, 64\].*got \[10, 63\]"):
        run_treatment(small_ws, CFG, np.zeros((10, 63), bool))
    with pytest.raises(CfdebugError, match="non-negative finite"):
        check_global_sets(np.full((10, 64), np.nan), 10, 64)
    hist = np.zeros((2, 3))
    hist[0, 1] = 4
    assert check_global_sets(hist, 2, 3).tolist() == [[False, True, False], [False, False, False]]


def test_training_sets_are_h_greater_than_zero_of_the_workspace_filters(monkeypatch):
    """The production G_y (what a treat run trains with): every filter whose histogram is > 0,
    however rare; detection's set at f = 0.15 would drop the rare ones."""
    from cfdebug.mcfilters import GlobalFilters, detection_sets

    hist = np.array([[40, 3, 0, 1], [0, 0, 0, 0], [5, 0, 5, 0]], dtype=np.int64)
    filters = GlobalFilters(histogram=hist, magnitude=np.ones(hist.shape), counts=np.array([40, 0, 5]))
    seen = {}

    def fake_filters(workspace, config=None, progress=None):
        seen["workspace"] = workspace
        return filters

    monkeypatch.setattr(treatment, "global_mc_filters", fake_filters)
    sets = treatment.training_sets("the workspace")
    assert seen["workspace"] == "the workspace"
    assert sets.dtype == bool and sets.tolist() == [[True, True, False, True], [False] * 4, [True, False, True, False]]
    assert detection_sets(hist).tolist()[0] == [True, False, False, False]  # 3 and 1 are below 0.15·40 = 6
    # run_treatment binarises a histogram it is given the same way
    assert check_global_sets(hist, 3, 4).tolist() == sets.tolist()


# ---------------------------------------------------------------------------------- the sweep's spec
def test_a_treat_spec_holds_the_loss_weights_once():
    """λ1 and λ2 live in the spec's grids only: its ``treatment`` is the schedule the runs share."""
    from cfdebug.config import WorkspaceConfig, config_dict
    from cfdebug.jobs import _parse_treat_spec, treat_spec

    ws = WorkspaceConfig(device="cpu", workdir="/tmp/unused")
    spec = treat_spec(ws, TreatmentSchedule(epochs=2, seed=7), [1e-3, 0.1], [2e-5], [7, 8])
    assert "lambda1" not in spec["treatment"] and "lambda2" not in spec["treatment"]
    assert (spec["lambdas1"], spec["lambdas2"], spec["seeds"]) == ([1e-3, 0.1], [2e-5], [7, 8])
    _, schedule, l1, l2, seeds = _parse_treat_spec(spec)
    assert schedule == TreatmentSchedule(epochs=2, seed=7) and (l1, l2, seeds) == ([1e-3, 0.1], [2e-5], [7, 8])
    # a run.json written before the split held the first pair in `treatment` too: it is read, the grids win
    old = {**spec, "treatment": {**spec["treatment"], "lambda1": 1e-3, "lambda2": 2e-5}}
    assert _parse_treat_spec(old)[1] == schedule
    with pytest.raises(CfdebugError, match="^Expected the sweep's schedule as a TreatmentSchedule .* but got a TreatmentConfig"):
        treat_spec(ws, TreatmentConfig(), [1e-3], [2e-5], [0])
    with pytest.raises(CfdebugError, match=r"^Expected `lambdas1` to be in \[0, 1\], but got 3.0.$"):
        treat_spec(ws, TreatmentSchedule(), [1e-3, 3.0], [2e-5], [0])
    assert config_dict(schedule) == spec["treatment"]


def test_every_run_of_a_sweep_takes_its_weights_from_the_grids():
    """Each (λ1, λ2) and seed of the grids is one run; nothing else sets a weight."""
    schedule = TreatmentSchedule(epochs=2, lr=3e-4)
    configs = treatment._sweep_configs(schedule, [1e-3, 0.1], [2e-5, 1e-4], [3, 4])
    assert [(kind, c.lambda1, c.lambda2, c.seed) for kind, c in configs] == [
        ("fine-tuned", 0.0, 0.0, 3), ("treatment", 1e-3, 2e-5, 3), ("treatment", 1e-3, 1e-4, 3), ("treatment", 0.1, 2e-5, 3),
        ("treatment", 0.1, 1e-4, 3), ("fine-tuned", 0.0, 0.0, 4), ("treatment", 1e-3, 2e-5, 4), ("treatment", 1e-3, 1e-4, 4),
        ("treatment", 0.1, 2e-5, 4), ("treatment", 0.1, 1e-4, 4),
    ]
    assert all(c.schedule == replace(schedule, seed=c.seed) for _, c in configs)
    with pytest.raises(CfdebugError, match="but got a TreatmentConfig"):
        treatment_sweep(None, [1e-3], [2e-5], [0], None, schedule=TreatmentConfig())


def test_the_runs_table_shows_every_swept_value():
    from cfdebug.ui.treatment import grid_labels

    spec = {"treatment": {"epochs": 3}, "lambdas1": [1e-3, 0.1], "lambdas2": [2e-5], "seeds": [0, 1, 2]}
    assert grid_labels(spec) == {"λ1": "0.001, 0.1", "λ2": "2e-05", "seeds": "3 seeds: 0, 1, 2"}


def test_trainable_modules():
    demo = build_model("demo-cnn", 10)
    target = resolve_target(demo)
    assert trainable_modules(demo, target) == ["features.17", "features.18", "features.19", "classifier"]
    assert trainable_modules(demo, target, "head") == ["classifier"]
    assert trainable_modules(demo, target, "all") == [""]
    resnet = build_model("resnet18", 10)
    assert trainable_modules(resnet, resolve_target(resnet)) == ["layer4", "fc"]


def test_table3_orders_and_filters():
    before = np.array([0.5, 0.5, 0.5, 0.5, np.nan, 0.9])
    after = np.array([0.9, 0.6, 0.5, 0.2, 0.7, 0.8])
    t = table3(before, after, list("abcdef"))
    assert [r["class"] for r in t["improved"]] == ["a", "b"]
    assert [r["class"] for r in t["worsened"]] == ["d", "f"]
    assert t["worsened"][0]["change"] == pytest.approx(-0.3)


# ---------------------------------------------------------------------------------- the loop
@pytest.mark.slow
def test_reference_run_outputs(small_ws, reference):
    out, k = reference.out, small_ws.data.num_classes
    assert [r["epoch"] for r in out["history"]] == [1, 2, 3]
    for row in out["history"]:
        assert {"loss", "ce", "mc", "non_mc", "train_acc", "val_acc", "test_acc", "train_seconds"} <= row.keys()
    best = max(out["history"], key=lambda r: (r["val_acc"], -r["val_loss"]))  # first maximum, like the loop
    assert out["best_epoch"] == best["epoch"]
    assert out["accuracy"] == {s: best[f"{s}_acc"] for s in ("train", "val", "test")}
    assert out["per_class_recall_before"].shape == out["per_class_recall_after"].shape == (k,)
    assert out["confusion_delta"].shape == (k, k) and out["confusion_delta"].sum() == 0
    labels = small_ws.data.splits["test"].labels
    churn = prediction_churn(out["base_test_predictions"], out["test_predictions"], labels, k)
    assert out["churn"] == {"fixed": churn["fixed"].size, "broken": churn["broken"].size}
    np.testing.assert_array_equal(out["confusion_delta"], churn["confusion_delta"])
    assert out["accuracy"]["test"] - out["base_accuracy"]["test"] == pytest.approx(
        (churn["fixed"].size - churn["broken"].size) / len(labels))
    assert set(out["table3"]) == {"improved", "worsened"}
    saved = torch.load(reference.run_dir / "model.pt", weights_only=True)
    assert _same_state(saved, out["state_dict"])
    assert count_hooks(small_ws.model) == 0


@pytest.mark.slow  # the reference fixture: a 3-epoch treatment run
def test_frozen_part_and_workspace_model_unchanged(small_ws, reference):
    before, after = reference.before, reference.out["state_dict"]
    frozen = [k for k in before if k.startswith(FROZEN_PREFIXES)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # incl. BN running stats
    assert not torch.equal(before["features.17.weight"], after["features.17.weight"])
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    # the workspace's model itself is never trained
    assert _same_state(before, small_ws.model.state_dict())
    assert all(p.requires_grad for p in small_ws.model.parameters())


@pytest.mark.slow
def test_model_selection_never_uses_test_labels(small_ws, global_sets, reference):
    test = small_ws.data.splits["test"]
    shuffled = dataclasses.replace(test, labels=np.random.default_rng(1).permutation(test.labels))
    data = dataclasses.replace(small_ws.data, splits={**small_ws.data.splits, "test": shuffled})
    ws = SimpleNamespace(**{**vars(small_ws), "data": data})
    out = run_treatment(ws, CFG, global_sets)
    ref = reference.out
    assert out["best_epoch"] == ref["best_epoch"]
    assert _same_state(out["state_dict"], ref["state_dict"])
    assert [r["val_acc"] for r in out["history"]] == [r["val_acc"] for r in ref["history"]]
    assert [r["test_acc"] for r in out["history"]] != [r["test_acc"] for r in ref["history"]]


@pytest.mark.slow
def test_control_is_treatment_with_zero_lambdas(small_ws, global_sets):
    cfg = replace(CFG, epochs=1)
    ce_only = finetune(small_ws, cfg)  # default loss: plain cross-entropy
    control = run_treatment(small_ws, control_config(cfg), global_sets)
    assert _same_state(ce_only.state_dict, control["state_dict"])
    treated = run_treatment(small_ws, replace(cfg, lambda1=0.5, lambda2=0.1), global_sets)
    assert not _same_state(treated["state_dict"], control["state_dict"])


def test_batch_transform_and_head_only(small_ws):
    """XCR's use: each batch doubled by ``batch_transform``; a custom ``loss_fn``; only the head trains."""
    seen = []

    def double(images, labels, indices):
        return torch.cat([images, images.flip(-1)]), torch.cat([labels, labels])

    def loss_fn(batch):
        seen.append((len(batch.images), len(batch.labels), len(batch.indices), tuple(batch.pooled.shape)))
        return cross_entropy_loss(batch)

    result = finetune(small_ws, FinetuneConfig(epochs=1, batch_size=32, trainable="head"), loss_fn=loss_fn, batch_transform=double)
    assert seen[0] == (64, 64, 32, (64, 64)) and len(seen) == 5
    assert result.trainable == ["classifier"] and result.trainable_parameters == 64 * 10 + 10
    before = small_ws.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], result.state_dict[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


@pytest.mark.slow
def test_kill_and_resume_is_exact(small_ws, global_sets, reference, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first_epoch(fraction, message):
        if fraction >= 1 / 3:
            raise Stop(message)

    with pytest.raises(Stop):
        run_treatment(small_ws, CFG, global_sets, run_dir=tmp_path, progress=stop_after_first_epoch)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    resumed = run_treatment(small_ws, CFG, global_sets, run_dir=tmp_path, resume=True)
    ref = reference.out
    assert resumed["resumed_from"] == 1
    assert _timing_free(resumed["history"]) == _timing_free(ref["history"])
    assert resumed["accuracy"] == ref["accuracy"] and resumed["best_epoch"] == ref["best_epoch"]
    assert _same_state(resumed["state_dict"], ref["state_dict"])
    assert np.array_equal(resumed["confusion_delta"], ref["confusion_delta"])


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_resume_is_exact(small_ws, global_sets, reference, workdir, tmp_path):
    """A real crash: the child is SIGKILLed while it sits in epoch 2; the parent resumes it."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from cfdebug.config import WorkspaceConfig
        from cfdebug.treatment import run_treatment
        from cfdebug.workspace import Workspace
        from tests.test_treatment import CFG, small_workspace, top_quartile_sets

        ws = small_workspace(Workspace(WorkspaceConfig(workdir={str(workdir)!r}, device="cpu")))

        def hang_after_first_epoch(fraction, message):
            if fraction >= 1 / 3:
                time.sleep(600)  # killed here; the epoch-1 checkpoint is on disk

        run_treatment(ws, CFG, top_quartile_sets(ws), run_dir={str(run_dir)!r}, progress=hang_after_first_epoch)
        """
    )
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            assert time.monotonic() < deadline, "the child wrote no checkpoint in time"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    resumed = run_treatment(small_ws, CFG, global_sets, run_dir=run_dir, resume=True)
    assert resumed["resumed_from"] == 1
    assert _timing_free(resumed["history"]) == _timing_free(reference.out["history"])
    assert _same_state(resumed["state_dict"], reference.out["state_dict"])
    assert not list(run_dir.glob(".*.tmp"))


@pytest.mark.slow  # the reference fixture: a 3-epoch treatment run
def test_resume_refuses_changed_inputs_and_finished_run_reloads(small_ws, global_sets, reference):
    with pytest.raises(CfdebugError, match=r"`config\.lambda1` was 0\.001, now 0\.002"):
        run_treatment(small_ws, replace(CFG, lambda1=2e-3), global_sets, run_dir=reference.run_dir, resume=True)
    with pytest.raises(CfdebugError, match="global_sets"):
        run_treatment(small_ws, CFG, ~global_sets, run_dir=reference.run_dir, resume=True)
    other = SimpleNamespace(**{**vars(small_ws), "model_digest": "another-model"})
    with pytest.raises(CfdebugError, match="base_model"):
        run_treatment(other, CFG, global_sets, run_dir=reference.run_dir, resume=True)
    again = run_treatment(small_ws, CFG, global_sets, run_dir=reference.run_dir, resume=True)
    assert again["resumed_from"] == 3
    assert _same_state(again["state_dict"], reference.out["state_dict"])


@pytest.mark.slow
def test_nan_loss_fails_naming_the_term_and_keeps_checkpoint(small_ws, global_sets, tmp_path, monkeypatch):
    registry = RunRegistry(tmp_path / "home")
    run_id = registry.create("treat", {}).run_id
    run_dir = tmp_path / "run"
    real = treatment.treatment_loss
    batches_per_epoch = math.ceil(160 / CFG.batch_size)
    calls = []

    def diverging(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) > batches_per_epoch + 1:  # second batch of epoch 2
            out["mc"] = out["mc"] * float("nan")
            out["loss"] = out["ce"] - out["mc"]
        return out

    monkeypatch.setattr(treatment, "treatment_loss", diverging)
    with pytest.raises(CfdebugError, match=r"epoch 2, batch 1: the `mc` term is nan.*epoch 1\) is kept"):
        run_treatment(small_ws, CFG, global_sets, run_dir=run_dir, registry=registry, run_id=run_id)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and (run_dir / ckpt["best_file"]).is_file()
    rec = registry.get(run_id)
    assert rec.status == "failed" and "`mc` term is nan" in rec.error
    rows = registry.progress(run_id)
    assert [r["epoch"] for r in rows] == [1] and rows[0]["lambda1"] == CFG.lambda1


def test_cancel_requested_stops_between_batches(small_ws, global_sets, tmp_path):
    registry = RunRegistry(tmp_path)
    run_id = registry.create("treat", {}).run_id
    registry.request_cancel(run_id)
    with pytest.raises(RunCancelled):
        run_treatment(small_ws, CFG, global_sets, run_dir=tmp_path / "run", registry=registry, run_id=run_id)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_sweep_tables(small_ws, global_sets):
    messages = []
    out = treatment_sweep(
        small_ws, [1e-3], [2e-5, 1e-4], [0, 1], global_sets, progress=lambda f, m: messages.append(f), schedule=TreatmentSchedule(epochs=1)
    )
    assert {"base", "control", "runs", "table2", "table3", "best"} <= out.keys()
    assert len(out["control"]) == 2 and len(out["runs"]) == 4
    for run in out["runs"]:
        assert {"lambda1", "lambda2", "seed", "train_acc", "val_acc", "test_acc", "per_class_recall"} <= run.keys()
    models = [r["model"] for r in out["table2"]]
    assert models == ["base", "fine-tuned", "treatment", "treatment"]
    row = out["table2"][2]
    accs = [r["test_acc"] for r in out["runs"] if (r["lambda1"], r["lambda2"]) == (row["lambda1"], row["lambda2"])]
    assert row["n_seeds"] == 2
    assert row["test_acc_mean"] == pytest.approx(np.mean(accs)) and row["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert out["table2"][0]["test_acc_mean"] == out["base"]["test_acc"] and out["table2"][0]["test_acc_std"] == 0.0
    assert messages == sorted(messages) and messages[-1] == pytest.approx(1.0)


def test_flagged_churn_counts_on_hand_made_results():
    from cfdebug.treatment import flagged_churn

    def images(rows):  # (flagged, error): an error predicts class 1 for a true class 0
        return {"images": [{"id": str(i), "flagged": f, "error": e, "true": 0, "predicted": int(e)} for i, (f, e) in enumerate(rows)]}

    before = images([(True, True), (True, True), (False, False), (True, False), (False, True)])
    after = images([(False, False), (True, True), (True, True), (False, False), (False, True)])
    churn = flagged_churn(before, after)
    assert churn["flagged_errors_before"] == 2 and churn["flagged_errors_fixed"] == 1
    assert churn["new_errors"] == 1 and churn["new_errors_flagged"] == 1
    assert churn["flagged_before"] == 3 and churn["flagged_after"] == 2
    assert churn["fixed_ids"] == ["0"] and churn["new_error_ids"] == ["2"]
    with pytest.raises(CfdebugError, match="same images"):
        flagged_churn(before, images([(False, False)]))
