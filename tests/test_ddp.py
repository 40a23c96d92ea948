"""Data-parallel fine-tuning: 2 CPU processes (gloo, ``torchrun --standalone``) against 1.

The child job runs the same treatment as the test process (demo workspace, 2 epochs, seed 0,
global batch 64 = 2 × 32) and reports from every rank. With equal shards, global-batch
BatchNorm statistics, the single-process dropout mask and DDP's gradient mean, the two runs
follow the same optimisation; only float rounding differs (gradient sums in another order,
BatchNorm statistics from summed moments). Measured on 2 CPU cores: identical train/val/test
accuracy (0 images apart), weights within 1.2e-7, per-epoch loss terms within 1e-7 relative.

Tolerances asserted: accuracy within 2 images per split (val 2/180 = 1.1 pp, test 2/539 =
0.37 pp; room for a rounding-level logit tie to flip), weights within 1e-4 (about 1000× the
measured rounding, far below the effect of one changed dropout mask or a different batch
order), loss terms within 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cfdebug import distributed
from cfdebug.treatment import TreatmentConfig, run_treatment

REPO_ROOT = Path(__file__).resolve().parents[1]
CFG = TreatmentConfig(epochs=2, batch_size=64, lr=1e-2, seed=0)
IMAGES_TOLERANCE = 2
WEIGHT_ATOL = 1e-4
TERMS_RTOL = 1e-4


def fixed_sets() -> np.ndarray:
    """[10, 64] bool global MC sets (seeded; the child draws the very same ones)."""
    return np.random.default_rng(0).random((10, 64)) < 0.25


CHILD = textwrap.dedent(
    """
    import json, os, sys
    from dataclasses import replace
    from pathlib import Path

    import numpy as np
    import torch

    sys.path.insert(0, {root!r})
    import cfdebug.training as training
    import cfdebug.training.checkpoints as checkpoints
    import cfdebug.treatment as treatment
    from cfdebug.config import WorkspaceConfig
    from cfdebug.distributed import broadcast_object, init_distributed, main_first, shutdown
    from cfdebug.errors import CfdebugError
    from cfdebug.runs import RunRegistry
    from cfdebug.workspace import Workspace
    from tests.test_ddp import CFG, fixed_sets

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    ctx = init_distributed("cpu")
    writes = []
    save = treatment.torch_save_atomic

    def recording_save(payload, path):
        writes.append([Path(path).parent.name, Path(path).name])
        save(payload, path)

    treatment.torch_save_atomic = recording_save  # model.pt
    checkpoints.torch_save_atomic = recording_save  # checkpoints and best weights
    with main_first():  # rank 0 loads (or trains) the cached demo model first
        ws = Workspace(WorkspaceConfig(workdir=spec["workdir"], device=str(ctx.device)))
    registry = RunRegistry(spec["registry"])
    run_id = broadcast_object(registry.create("treat", {{}}).run_id if ctx.is_main else None)
    fresh = treatment.run_treatment(ws, CFG, fixed_sets(), run_dir=spec["fresh"], registry=registry, run_id=run_id)
    resumed = treatment.run_treatment(ws, CFG, fixed_sets(), run_dir=spec["resume"], resume=True)

    def nan_on_rank1(batch):  # one process alone diverges: every process must stop, none hang
        ce = torch.nn.functional.cross_entropy(batch.logits, batch.labels)
        if batch.rank == 1 and batch.step == 2:
            ce = ce * float("nan")
        return {{"loss": ce, "ce": ce}}

    errors = {{}}
    for name, call in (
        ("nan", lambda: training.finetune(ws, CFG, loss_fn=nan_on_rank1)),
        ("batch_size", lambda: training.finetune(ws, replace(CFG, batch_size=63))),
    ):
        try:
            call()
            errors[name] = None
        except CfdebugError as exc:
            errors[name] = str(exc)

    def summary(result):
        keep = ("accuracy", "best_epoch", "history", "resumed_from", "world_size")
        return {{k: result[k] for k in keep}}

    report = {{"rank": ctx.rank, "world_size": ctx.world_size, "writes": writes, "run_id": run_id,
               "fresh": summary(fresh), "resumed": summary(resumed), "errors": errors}}
    (out / f"rank{{ctx.rank}}.json").write_text(json.dumps(report))
    if ctx.is_main:
        torch.save({{"fresh": fresh["state_dict"], "resumed": resumed["state_dict"]}}, out / "states.pt")
    shutdown()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)  # as `python -m cfdebug` ends under torchrun: no interpreter finalisation after the group is gone
    """
)


class _StopAfterFirstEpoch(Exception):
    pass


def _stop_after_first_epoch(fraction: float, message: str) -> None:
    if fraction >= 0.5:
        raise _StopAfterFirstEpoch  # the epoch-1 checkpoint is on disk by now


def _timing_free(history):
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in history]


def _assert_same_run(ddp: dict, ddp_state: dict, single: dict, label: str) -> None:
    for split, n in (("train", 1078), ("val", 180), ("test", 539)):
        diff = abs(ddp["accuracy"][split] - single["accuracy"][split])
        assert diff <= IMAGES_TOLERANCE / n + 1e-12, f"{label}: {split} accuracy {ddp['accuracy'][split]} vs {single['accuracy'][split]}"
    assert ddp["best_epoch"] == single["best_epoch"], label
    for row_d, row_s in zip(_timing_free(ddp["history"]), _timing_free(single["history"]), strict=True):
        for key in ("loss", "ce", "mc", "non_mc"):
            assert row_d[key] == pytest.approx(row_s[key], rel=TERMS_RTOL, abs=1e-6), f"{label}: epoch {row_s['epoch']} {key}"
    state = single["state_dict"]
    assert ddp_state.keys() == state.keys()
    worst = max(float((ddp_state[k].double() - state[k].double()).abs().max()) for k in state)
    assert worst <= WEIGHT_ATOL, f"{label}: weights differ by up to {worst:.3g}"


@pytest.mark.slow
def test_two_process_ddp_matches_single_process_and_only_rank0_writes(demo_workspace, workdir, tmp_path):
    ws = demo_workspace
    assert {s: len(ws.data.splits[s]) for s in ("train", "val", "test")} == {"train": 1078, "val": 180, "test": 539}
    # 1078 = 16 × 64 + 54: the last batch splits evenly too, so no image is left out per epoch.
    resume_dir = tmp_path / "resume"
    with pytest.raises(_StopAfterFirstEpoch):
        run_treatment(ws, CFG, fixed_sets(), run_dir=resume_dir, progress=_stop_after_first_epoch)
    assert (resume_dir / "checkpoint.pt").is_file()

    spec = {
        "workdir": str(workdir), "registry": str(tmp_path / "registry"), "out": str(tmp_path),
        "fresh": str(tmp_path / "ddp"), "resume": str(resume_dir),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "child.py").write_text(CHILD.format(root=str(REPO_ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CFDEBUG_HOME": str(workdir), "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "child.py"), str(tmp_path / "spec.json")]
    t0 = time.perf_counter()
    child = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    ddp_seconds = time.perf_counter() - t0
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]

    t0 = time.perf_counter()
    single = run_treatment(ws, CFG, fixed_sets(), run_dir=tmp_path / "single")
    single_seconds = time.perf_counter() - t0
    reports = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    states = torch.load(tmp_path / "states.pt", weights_only=True)

    # Both ranks ran in one job of 2 and return the same result.
    assert [reports[r]["world_size"] for r in (0, 1)] == [2, 2]
    for key in ("fresh", "resumed"):
        a, b = reports[0][key], reports[1][key]
        assert {k: v for k, v in a.items() if k != "history"} == {k: v for k, v in b.items() if k != "history"}
        assert _timing_free(a["history"]) == _timing_free(b["history"])
    fresh = {**reports[0]["fresh"], "state_dict": states["fresh"]}
    assert fresh["world_size"] == 2 and fresh["resumed_from"] == 0
    _assert_same_run(fresh, states["fresh"], single, "fresh 2-process run")

    # Only rank 0 wrote: checkpoints, the best weights, model.pt and the registry's progress rows.
    assert reports[1]["writes"] == []
    best = fresh["best_epoch"]
    fresh_writes = [name for folder, name in reports[0]["writes"] if folder == "ddp"]
    assert fresh_writes.count("checkpoint.pt") == CFG.epochs and fresh_writes.count("model.pt") == 1
    assert set(fresh_writes) <= {"checkpoint.pt", "model.pt"} | {f"best-epoch{e}.pt" for e in range(1, CFG.epochs + 1)}
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(["checkpoint.pt", f"best-epoch{best}.pt", "model.pt"])
    from cfdebug.runs import RunRegistry

    rows = RunRegistry(tmp_path / "registry").progress(reports[0]["run_id"])
    assert [r["epoch"] for r in rows] == [1, 2]

    # Resume under DDP from a single-process epoch-1 checkpoint ends where the single run ends.
    resumed = {**reports[0]["resumed"], "state_dict": states["resumed"]}
    assert resumed["resumed_from"] == 1
    _assert_same_run(resumed, states["resumed"], single, "2-process resume")
    assert not list((tmp_path / "ddp").glob(".*.tmp")) and not list(resume_dir.glob(".*.tmp"))

    # Failures stop every process together, with a message (no hang, no traceback-only exit).
    assert "epoch 1, batch 2: the `ce` term is nan" in reports[1]["errors"]["nan"]
    assert "epoch 1, batch 2: the `ce` term is not finite on another process" in reports[0]["errors"]["nan"]
    for r in (0, 1):
        assert "Expected `batch_size` to be divisible by the number of processes (2)" in reports[r]["errors"]["batch_size"]
    print(f"2-process job {ddp_seconds:.1f} s (start-up, fresh run, resumed epoch), 1-process run {single_seconds:.1f} s; accuracy 2-process {fresh['accuracy']} vs 1-process {single['accuracy']}")


def test_single_process_context_and_helpers(monkeypatch):
    """Without torchrun the context is rank 0 of 1 and every helper is a local no-op."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.device) == (0, 1, 0, True, torch.device("cpu"))
    assert not distributed.is_distributed()
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_mean(x), x) and distributed.all_reduce_mean(x) is not x
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(3) == [3]
    distributed.barrier()
    with distributed.main_first():
        pass
    bn = torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn)
    with distributed.global_batchnorm(model) as swapped:
        assert swapped == [] and model[1] is bn


def test_global_batchnorm_matches_batchnorm_in_one_process(monkeypatch):
    """The GlobalBatchNorm arithmetic (shifted moments, running-stat update, gradients) against
    nn.BatchNorm2d. The all-reduce over one process is the identity, so with the distributed
    branch forced on, the formula itself is what is checked."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1), ref.running_mean.uniform_(-1, 1)
    shared = torch.nn.BatchNorm2d(5, momentum=0.3)
    shared.load_state_dict(ref.state_dict())
    g = distributed.GlobalBatchNorm(shared)
    x = (torch.randn(6, 5, 3, 3) * 3 + 4).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "differentiable_all_reduce_sum", lambda t: t)
    y = g(x)
    y_ref = ref(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shared.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.running_mean, ref.running_mean)
    torch.testing.assert_close(shared.running_var, ref.running_var)
    assert int(shared.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    assert g.state_dict().keys() == ref.state_dict().keys()
