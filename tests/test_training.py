"""Tests for the training engine (cfdebug.training.run_epochs) and the stages that run on it.

The engine's own behaviour (resume, divergence, cancel) is checked on a toy stage: a tiny MLP
with dropout (so the global RNG matters) on seeded random data, drawn by one generator that
continues across epochs (so the checkpointed generator state matters). The common history
schema is checked on the three real stages, each on a few images for one epoch.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from cfdebug.config import FinetuneConfig, SelectorConfig, TrainConfig
from cfdebug.errors import CfdebugError
from cfdebug.models import DEMO_MODEL, build_model
from cfdebug.runs import RunCancelled, RunRegistry
from cfdebug.training import HISTORY_KEYS, UNEVALUATED_HISTORY_KEYS, Stage, StepOutput, finetune, run_epochs, train_classifier
from cfdebug.xcr.selector import train_selector

EPOCHS = 3


def _timing_free(history):
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in history]


def toy_stage(nan_at: tuple[int, int] | None = None, seed: int = 0) -> Stage:
    """A fresh, seeded toy stage: 40 training points of 6 features in 4 classes, batches of 8."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(60, 6, generator=g), torch.randint(0, 4, (60,), generator=g)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:40], y[:40]), batch_size=8, shuffle=True, generator=generator)

    def step(batch, epoch, index):
        logits = model(batch[0])
        ce = nn.functional.cross_entropy(logits, batch[1])
        aux = logits.pow(2).mean() * (float("nan") if (epoch, index) == nan_at else 1.0)
        return StepOutput({"loss": ce + 0.01 * aux, "ce": ce, "aux": aux}, len(batch[1]), int((logits.argmax(1) == batch[1]).sum()))

    def evaluate():
        model.eval()
        with torch.no_grad():
            val = model(x[40:50])
            test = model(x[50:])
        return {
            "val_acc": float((val.argmax(1) == y[40:50]).float().mean()),
            "val_loss": float(nn.functional.cross_entropy(val, y[40:50])),
            "test_acc": float((test.argmax(1) == y[50:]).float().mean()),
        }

    return Stage(name="toy training", model=model, optimizer=optimizer, batches=lambda epoch: data, step=step,
                 evaluate=evaluate, generator=generator, term_mean="sample")


class _Stop(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full = run_epochs(toy_stage(), EPOCHS, run_dir=tmp_path / "full")

    def stop_after_first_epoch(fraction, message):
        if fraction >= 1 / EPOCHS:
            raise _Stop(message)

    with pytest.raises(_Stop):
        run_epochs(toy_stage(), EPOCHS, run_dir=tmp_path / "cut", progress=stop_after_first_epoch)
    torch.manual_seed(999)  # whatever the process did meanwhile: the checkpoint's RNG state wins
    resumed = run_epochs(toy_stage(), EPOCHS, run_dir=tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 1 and full.resumed_from == 0
    assert _timing_free(resumed.history) == _timing_free(full.history)
    assert resumed.best_epoch == full.best_epoch
    assert full.best_state.keys() == resumed.best_state.keys()
    assert all(torch.equal(full.best_state[k], resumed.best_state[k]) for k in full.best_state)
    # Without the checkpoint the same run from epoch 2 would differ (the RNG streams matter here).
    assert [r["loss"] for r in full.history] != [r["loss"] for r in run_epochs(toy_stage(seed=1), EPOCHS).history]


def test_resume_refuses_another_identity(tmp_path):
    run_epochs(toy_stage(), 1, run_dir=tmp_path, identity={"config": {"lr": 0.1}})
    with pytest.raises(CfdebugError, match=r"`config\.lr` was 0\.1, now 0\.2"):
        run_epochs(toy_stage(), 2, run_dir=tmp_path, resume=True, identity={"config": {"lr": 0.2}})


def test_divergence_names_epoch_batch_and_term_and_keeps_the_checkpoint(tmp_path):
    registry = RunRegistry(tmp_path / "home")
    run_id = registry.create("toy", {}).run_id
    with pytest.raises(CfdebugError, match=r"Toy training diverged at epoch 2, batch 1: the `aux` term is nan\. The last good checkpoint \(epoch 1\) is kept"):
        run_epochs(toy_stage(nan_at=(2, 1)), EPOCHS, run_dir=tmp_path / "run", registry=registry, run_id=run_id)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert registry.get(run_id).status == "failed" and "`aux` term is nan" in registry.get(run_id).error
    with pytest.raises(CfdebugError, match=r"epoch 1, batch 0: the `aux` term is nan\. No checkpoint was written"):
        run_epochs(toy_stage(nan_at=(1, 0)), EPOCHS)


def test_cancel_hook_stops_between_batches(tmp_path):
    stage = toy_stage()
    steps = []
    inner = stage.step
    stage.step = lambda batch, epoch, index: steps.append((epoch, index)) or inner(batch, epoch, index)
    polls = []

    def should_stop():
        polls.append(1)
        return len(polls) > 7  # 5 batches per epoch: stop before batch 2 of epoch 2

    with pytest.raises(RunCancelled, match="toy training was cancelled during epoch 2"):
        run_epochs(stage, EPOCHS, should_stop=should_stop)
    assert steps[-1] == (2, 1) and len(steps) == 7

    registry = RunRegistry(tmp_path)
    run_id = registry.create("toy", {}).run_id
    registry.request_cancel(run_id)
    with pytest.raises(RunCancelled, match=run_id):
        run_epochs(toy_stage(), EPOCHS, run_dir=tmp_path / "run", registry=registry, run_id=run_id)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_registry_and_run_id_go_together():
    with pytest.raises(CfdebugError, match="both `registry` and `run_id`"):
        run_epochs(toy_stage(), 1, run_id="x")


def test_model_selection_by_score_first_epoch_wins_ties():
    stage = toy_stage()
    stage.score = lambda row: (0.0,)  # every epoch ties
    assert run_epochs(stage, EPOCHS).best_epoch == 1
    stage = toy_stage()
    stage.score = lambda row: (row["epoch"],)
    run = run_epochs(stage, EPOCHS)
    assert run.best_epoch == EPOCHS and [r["best_epoch"] for r in run.history] == [1, 2, 3]


def _summed(stage: Stage, count_correct: bool) -> Stage:
    """``stage`` with a step that returns batch *sums* (each mean term times the batch size)."""
    inner = stage.step

    def step(batch, epoch, index):
        out = inner(batch, epoch, index)
        return StepOutput({k: v * out.size for k, v in out.terms.items()}, out.size, out.correct if count_correct else None)

    stage.step = step
    return stage


def test_a_stage_without_evaluation_keeps_its_last_epoch_and_reports_no_scores():
    """``evaluate=None, score=None`` (the CFE fit): no accuracy or validation key is made up, the
    last epoch is kept; ``term_mean="sum"`` divides the epoch's batch sums by its sample count."""
    stage = _summed(toy_stage(), count_correct=False)
    stage.evaluate, stage.score, stage.term_mean = None, None, "sum"
    run = run_epochs(stage, EPOCHS)
    assert [set(r) for r in run.history] == [{*UNEVALUATED_HISTORY_KEYS, "ce", "aux"}] * EPOCHS
    assert run.best_epoch == EPOCHS and [r["best_epoch"] for r in run.history] == [1, 2, 3]
    assert all(torch.equal(run.best_state[k], v) for k, v in stage.model.state_dict().items())
    # The same optimisation as with evaluation (which draws no RNG); 5 batches of 8 per epoch, so
    # the per-sample mean of the sums is the per-batch mean over 8.
    reference = _summed(toy_stage(), count_correct=True)
    ref = run_epochs(reference, EPOCHS)
    assert all(torch.equal(v, reference.model.state_dict()[k]) for k, v in run.best_state.items())
    assert [r["loss"] * 8 for r in run.history] == pytest.approx([r["loss"] for r in ref.history], rel=1e-12)


def test_a_stage_without_evaluation_must_not_score():
    stage = toy_stage()
    stage.evaluate = None
    with pytest.raises(TypeError, match="score=None"):
        run_epochs(stage, 1)


def _no_dropout(stage: Stage) -> Stage:
    stage.train_mode = stage.model.eval  # dropout off: two half batches draw no other masks
    return stage


def test_a_step_may_accumulate_gradients_itself():
    """A step that back-propagates its batch in two halves (``accumulates_gradients``) takes the
    same optimizer steps as the engine's one backward pass on the whole batch (to rounding)."""
    whole = _no_dropout(toy_stage())
    whole_run = run_epochs(whole, 2)
    stage = _no_dropout(toy_stage())

    def step(batch, epoch, index):
        x, y = batch
        totals = {}
        for half in (slice(0, 4), slice(4, None)):
            logits = stage.model(x[half])
            ce = nn.functional.cross_entropy(logits, y[half], reduction="sum") / len(y)
            aux = logits.pow(2).sum() / (len(y) * logits.shape[1])
            (ce + 0.01 * aux).backward()
            for k, v in {"loss": ce + 0.01 * aux, "ce": ce, "aux": aux}.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
        return StepOutput({k: torch.tensor(v) for k, v in totals.items()}, len(y), 0)

    stage.step, stage.accumulates_gradients = step, True
    halves_run = run_epochs(stage, 2)
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(stage.model.state_dict()[k], v)
    assert [r["ce"] for r in halves_run.history] == pytest.approx([r["ce"] for r in whole_run.history], rel=1e-5)


# ---------------------------------------------------------------------------------- the three stages
@pytest.fixture(scope="module")
def tiny_ws(demo_workspace):
    """The demo workspace cut to 64 train / 32 val / 32 test images."""
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 64), ("val", 32), ("test", 32)):
        split = demo_workspace.data.splits[name]
        splits[name] = split.subset(np.sort(rng.choice(len(split), size=n, replace=False)))
    data = dataclasses.replace(demo_workspace.data, splits=splits)
    return SimpleNamespace(**{**vars(demo_workspace), "data": data})


@pytest.mark.slow
def test_history_schema_is_the_same_for_all_three_stages(tiny_ws):
    model = build_model(DEMO_MODEL, tiny_ws.data.num_classes)
    trained = train_classifier(model, tiny_ws.data, TrainConfig(epochs=1, batch_size=32), torch.device("cpu"))
    tuned = finetune(tiny_ws, FinetuneConfig(epochs=1, batch_size=32), tag={"seed": 0})
    _, _, selector = train_selector(tiny_ws, SelectorConfig(k=32, epochs=1, width=4))
    rows = {"train_classifier": trained.history[0], "finetune": tuned.history[0], "selector": selector.rows[0]}
    terms = {"train_classifier": {"ce"}, "finetune": {"ce", "seed"}, "selector": {"ce", "kl"}}
    for stage, row in rows.items():
        assert set(row) - terms[stage] == set(HISTORY_KEYS), stage
        assert all(isinstance(row[k], (int, float)) and math.isfinite(row[k]) for k in HISTORY_KEYS), (stage, row)
        assert row["epoch"] == row["best_epoch"] == 1 and row["best_val_acc"] == row["val_acc"]
    assert trained.history[0]["loss"] == trained.history[0]["ce"]


def test_long_epochs_report_their_batches_to_progress_only(monkeypatch):
    """Within an epoch the engine reports batches (so a time left can be measured before the first
    epoch ends); the history and the result are those of a run without it."""
    from cfdebug.training import engine

    quiet = run_epochs(toy_stage(), 2)
    calls = []
    monkeypatch.setattr(engine, "BATCH_REPORT_S", 0.0)
    loud = run_epochs(toy_stage(), 2, progress=lambda f, m: calls.append((f, m)))
    assert _timing_free(loud.history) == _timing_free(quiet.history)
    batch_calls = [c for c in calls if "batch" in c[1]]
    assert [m for _, m in batch_calls] == [f"epoch {e}/2: batch {b}/5" for e in (1, 2) for b in range(1, 6)]
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and batch_calls[0][0] == 0.1
