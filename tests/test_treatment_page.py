"""The Treatment page's helpers: live curves per run part, the loss terms' shares and their
warnings, the λ grids, the runs table, the metric deltas (cfdebug.ui.treatment, cfdebug.ui.choices)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cfdebug import viz
from cfdebug.config import TreatmentConfig
from cfdebug.runs import read_progress
from cfdebug.ui import treatment as tui
from cfdebug.ui.choices import TREATMENT_LAMBDA1_GRID, TREATMENT_LAMBDA2_GRID


def _epoch(part: str, epoch: int, **terms) -> dict:
    tag = {"lambda1": 0.0, "lambda2": 0.0, "seed": 0} if part == "control" else {"lambda1": 1e-3, "lambda2": 2e-5, "seed": 0}
    return {"epoch": epoch, "loss": 1.0, "ce": 0.3, "val_acc": 0.9, **tag, **terms}


def test_live_curves_draw_control_and_treated_as_their_own_labelled_series():
    """The engine's epoch rows carry the run part flat (lambda1, lambda2, seed); read from the progress
    stream as the monitor reads them, they become one series per part, labelled as a finished run's."""
    logged = [(1.0, {"fraction": 0.2, "stage": "sweep", "message": "run 1/2"}), (2.0, _epoch("control", 1)), (3.0, _epoch("control", 2)),
              (4.0, {"fraction": 0.6, "stage": "sweep", "message": "run 2/2"}), (5.0, _epoch("treated", 1, share_mc=0.9, share_non_mc=0.005))]
    rows = tui.live_rows(read_progress(logged, now=5.0))
    assert [r["part"] for r in rows] == ["control · seed 0", "control · seed 0", "treated λ1=0.001 λ2=2e-05 · seed 0"]
    finished = tui.history_rows({"control": [{"seed": 0, "history": [_epoch("control", 1), _epoch("control", 2)]}],
                                 "runs": [{"seed": 0, "lambda1": 1e-3, "lambda2": 2e-5,
                                           "history": [_epoch("treated", 1, share_mc=0.9, share_non_mc=0.005)]}]})
    position = ("fraction", "stage", "message")
    assert [{k: v for k, v in r.items() if k not in position} for r in rows] == finished  # the live view is the finished one so far
    fig = viz.training_curves(rows)
    names = {t.name for t in fig.data}
    assert names == {"control · seed 0", "treated λ1=0.001 λ2=2e-05 · seed 0"}
    dashed = {t.name for t in fig.data if t.line.dash == "dash"}
    assert dashed == {"control · seed 0"}
    acc = [k for k in fig.layout if k.startswith("yaxis") and fig.layout[k].tickformat == ".0%"]
    assert acc and all(tuple(fig.layout[k].range) == (0, 1.02) for k in acc)  # an accuracy axis never runs to 1.5


def test_a_term_under_one_percent_of_the_loss_is_called_out():
    rows = [{**_epoch("treated", e, share_mc=0.9, share_non_mc=s), "part": "treated λ1=0.001 λ2=2e-05 · seed 0"} for e, s in ((1, 0.2), (2, 2e-5))]
    rows.append({**_epoch("control", 2, share_mc=0.0, share_non_mc=0.0), "part": "control · seed 0"})  # the control logs its zero terms too
    shares = tui.loss_shares(rows)
    treated = next(s for s in shares if s["part"].startswith("treated"))
    assert treated["epoch"] == 2 and treated["λ2·L_nonMC"] == 2e-5 and treated["cross-entropy"] == pytest.approx(1 - 0.9 - 2e-5)
    [warning] = tui.share_warnings(rows)  # the latest epoch's share: 0.002%, not the first epoch's 20%
    assert warning.startswith("**λ2·L_nonMC is 0.002% of the loss**") and "cannot change the model" in warning
    control = next(s for s in shares if s["part"].startswith("control"))
    assert control["λ1·L_MC"] is None and control["λ2·L_nonMC"] is None  # no λ, no term: nothing to warn about
    assert tui.share_warnings([{**_epoch("treated", 1, share_mc=0.5, share_non_mc=0.05), "part": "t"}]) == []


def test_shares_a_lambda_would_give_on_a_base_model_batch(demo_workspace):
    from cfdebug.mcfilters import global_mc_filters

    for split in ("train", "val", "test"):  # what a prepare run up to "filters" makes (the page waits for it)
        demo_workspace.extractions.get(split)
    global_mc_filters(demo_workspace)
    terms = tui.base_batch_terms(demo_workspace)
    assert terms["batch_size"] == TreatmentConfig().batch_size and terms["ce"] > 0 and terms["mc"] > terms["non_mc"] > 0
    shares = tui.share_at(terms, 1e-3, 2e-5)
    total = terms["ce"] + 1e-3 * terms["mc"] + 2e-5 * terms["non_mc"]
    assert shares["mc"] == pytest.approx(1e-3 * terms["mc"] / total) and shares["non_mc"] == pytest.approx(2e-5 * terms["non_mc"] / total)
    assert tui.share_at(terms, 0.0, 0.0) == {"mc": 0.0, "non_mc": 0.0}
    # The grids span the range where each term matters: from under 1% to most of the loss.
    alone = lambda l1, l2: tui.share_at(terms, l1, l2)  # noqa: E731
    assert alone(min(v for v in TREATMENT_LAMBDA1_GRID if v), 0)["mc"] < 0.01 < 0.9 < alone(max(TREATMENT_LAMBDA1_GRID), 0)["mc"]
    assert alone(0, min(v for v in TREATMENT_LAMBDA2_GRID if v))["non_mc"] < 0.01 < 0.9 < alone(0, max(TREATMENT_LAMBDA2_GRID))["non_mc"]


def test_grids_are_log_spaced_and_hold_the_defaults():
    for grid in (TREATMENT_LAMBDA1_GRID, TREATMENT_LAMBDA2_GRID):
        assert grid[0] == 0.0 and list(grid) == sorted(grid) and all(0 < v <= 1 for v in grid[1:])
        ratios = np.asarray(grid[2:]) / np.asarray(grid[1:-1])
        assert set(np.round(ratios, 6)) <= {2.0, 2.5}  # 1-2-5 per decade
    assert TreatmentConfig.lambda1 in TREATMENT_LAMBDA1_GRID and TreatmentConfig.lambda2 in TREATMENT_LAMBDA2_GRID


def _record(status: str, **extra) -> SimpleNamespace:
    spec = {"lambdas1": [1e-3], "lambdas2": [2e-5], "seeds": [0], "treatment": {"epochs": 3}}
    fields = dict(run_id="treat-1", status=status, config=spec, result=None, error=None, active=status in ("queued", "running"))
    return SimpleNamespace(**{**fields, **extra})


def test_the_runs_table_never_shows_none_and_counts_seeds():
    assert tui.grid_labels({"seeds": [0]})["seeds"] == "seed 0"
    assert tui.grid_labels({"seeds": [0, 1, 2]})["seeds"] == "3 seeds: 0, 1, 2"
    progress = read_progress([(1.0, {"fraction": 0.3, "stage": "sweep", "message": "run 1/2"}), (2.0, _epoch("control", 1))], now=2.0)
    running = tui.run_row(_record("running"), progress)
    assert running["seeds"] == "seed 0" and running["progress"] == "running (the bar above)"
    assert running["latest val acc."] == "90.0% (control · seed 0, epoch 1)"
    assert tui.run_row(_record("queued"), None)["latest val acc."] == "—"
    result = {"best": {"lambda1": 1e-3, "lambda2": 2e-5},
              "table2": [{"model": "base", "test_acc_mean": 0.89}, {"model": "fine-tuned", "test_acc_mean": 0.9072},
                         {"model": "treatment", "lambda1": 1e-3, "lambda2": 2e-5, "test_acc_mean": 0.9128}]}
    done = tui.run_row(_record("done", result=result))
    assert done["test acc. treated / control"] == "91.3% / 90.7%"
    failed = tui.run_row(_record("failed", error="RuntimeError: boom"))
    assert failed["error"] == "RuntimeError: boom" and failed["progress"] == "stopped"
    for row in (running, done, failed):
        assert all(v is not None and v != "None" for v in row.values()), row


def test_no_change_is_neither_green_nor_red():
    assert tui.delta(0.00001, "vs control") == {"delta": "±0.00 pts vs control", "delta_color": "off", "delta_arrow": "off"}
    assert tui.delta(0.0148, "vs base") == {"delta": "+1.48 pts vs base"}
    assert tui.delta(-0.02, "vs control") == {"delta": "-2.00 pts vs control"}
    assert tui.percent(2e-5) == "0.002%" and tui.percent(0.0053) == "0.53%" and tui.percent(0.866) == "87%"
