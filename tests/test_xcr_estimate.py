"""The XCR default (Table 1 at the k, β used), paper B's sweep as an option, and the time estimate."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cfdebug.config import TABLE1_SWEEP, XCRConfig
from cfdebug.xcr import estimate as est
from cfdebug.xcr.estimate import UnitCosts, describe_duration, estimate_xcr, stage_spans, table1_modes


def test_the_default_table1_is_the_k_and_beta_the_run_uses():
    default, demo = XCRConfig(), XCRConfig.demo()
    for config in (default, demo):
        assert config.table1_grid() == ((config.k,), (config.selector.beta,)) and not config.table1_sweep
        assert table1_modes(config) == ("XCR", "random")  # no selector beyond the retraining's own
    moved = replace(demo, selector=replace(demo.selector, k=16, beta=0.1))
    assert moved.table1_grid() == ((16,), (0.1,))  # follows the selector, not a stored copy of it
    sweep = XCRConfig.demo(**TABLE1_SWEEP)
    assert sweep.table1_grid() == ((16, 32, 64), (0.1, 0.01, 0.001)) and sweep.table1_sweep
    assert table1_modes(sweep) == ("XCR", "VIBI", "random")
    report_style = XCRConfig.demo(table1_ks=(32,), table1_betas=(0.001,))  # what `report` asks for: all three modes
    assert table1_modes(report_style) == ("XCR", "VIBI", "random") and not report_style.table1_sweep
    assert XCRConfig.demo(table1_ks=()).table1_grid()[0] == ()  # no Table 1


class _Store:
    def __init__(self, present=()):
        self.present = set(present)

    def exists(self, kind, key):
        return (kind, key) in self.present


def _fake_workspace(present=()):
    """Just what the estimate reads: split sizes, the store, the key parts, the extraction cache."""
    splits = {"train": [0] * 1078, "val": [0] * 180, "test": [0] * 539}
    extractions = SimpleNamespace(KIND="extract", key=lambda split: f"x-{split}")
    return SimpleNamespace(data=SimpleNamespace(splits=splits, num_classes=10), store=_Store(present), key_parts={"model": "m"},
                           extractions=extractions)


UNITS = UnitCosts(selector_step=0.1, selector_forward=1e-4, selector_batch=64, vanilla_step=0.05, xcr_step=0.1, forward=1e-4,
                  scoring=2e-4, load=1e-5, retrain_batch=64, corruption={name: 1e-3 for name in XCRConfig().corruptions})


def test_estimate_is_the_measured_steps_times_the_work_asked_for():
    ws, config = _fake_workspace(), XCRConfig.demo()
    e = estimate_xcr(ws, config, UNITS)
    steps = -(-1078 // 64)
    selector = config.selector.epochs * (steps * 0.1 + 1078 * 1e-5 + (180 + 539) * (1e-4 + 1e-5))
    assert e.stages["table1"] == pytest.approx(selector + 1078 * 1e-4 + 539 * (1e-4 + 2e-4 + 1e-5) + 2 * 539 * 1e-4)
    assert e.stages["evaluate"] == pytest.approx(539 * 2 * 2e-4 + 45 * 539 * 2 * 2e-4 + 15 * 3 * 539 * 1e-3)
    assert e.low == pytest.approx(est.RANGE[0] * e.seconds) and e.high == pytest.approx(est.RANGE[1] * e.seconds)
    assert e.seconds == pytest.approx(sum(e.stages.values())) and not e.cached
    # The sweep trains an XCR and a VIBI selector per (k, β) pair: 18 against the default's one.
    sweep = estimate_xcr(ws, XCRConfig.demo(**TABLE1_SWEEP), UNITS)
    assert sweep.stages["table1"] > 15 * selector and sweep.stages["retrain"] == pytest.approx(e.stages["retrain"])
    assert "Table 1: 18 selectors to train, 9 (k, β)" in sweep.parts
    # Two more seeds: two more vanilla and XCR runs, two more models scored.
    three = estimate_xcr(ws, replace(config, seeds=(0, 1, 2)), UNITS)
    assert three.stages["retrain"] > 2.5 * (e.stages["retrain"] - selector) and three.stages["table1"] == e.stages["table1"]


def test_estimate_leaves_out_what_the_store_holds():
    from cfdebug.xcr.report import REPORT_KIND, report_key
    from cfdebug.xcr.selector import SELECTOR_KIND, selector_key

    config = XCRConfig.demo()
    ws = _fake_workspace()
    ws.store.present.add((SELECTOR_KIND, selector_key(ws, config.selector)))
    fresh = estimate_xcr(_fake_workspace(), config, UNITS)
    cached_selector = estimate_xcr(ws, config, UNITS)
    selector = est._selector_training(UNITS, config, {"train": 1078, "val": 180, "test": 539})
    assert fresh.seconds - cached_selector.seconds == pytest.approx(selector)  # a trained selector costs nothing
    ws.store.present.add((REPORT_KIND, report_key(ws, config)))
    done = estimate_xcr(ws, config, UNITS)
    assert done.cached and done.seconds == 0 and done.describe().startswith("read from the cache")


def test_stage_spans_follow_the_estimate():
    spans = stage_spans({"table1": 30.0, "retrain": 60.0, "evaluate": 10.0})
    assert list(spans) == ["table1", "retrain", "evaluate"]
    assert spans["table1"] == pytest.approx((0.0, 0.3)) and spans["retrain"] == pytest.approx((0.3, 0.9))
    assert spans["evaluate"][1] == 1.0
    tiny = stage_spans({"table1": 0.0, "retrain": 100.0, "evaluate": 0.0})
    assert all(hi - lo >= 0.0099 for lo, hi in tiny.values())  # every stage shows moving


def test_durations_read_as_ranges():
    assert describe_duration(40, 80) == "40–80 s"
    assert describe_duration(150, 300) == "2–5 min"
    assert describe_duration(2 * 3600, 4 * 3600) == "2.0–4.0 h"


def test_measuring_the_steps_changes_nothing(demo_workspace):
    """The calibration step times real steps on a copy: the model's weights and the RNG stay as they were."""
    before = {k: v.clone() for k, v in demo_workspace.model.state_dict().items()}
    rng = torch.get_rng_state()
    config = XCRConfig.demo(corruptions=("gaussian_noise", "fog"), severities=(3,))
    units = est.measure_unit_costs(demo_workspace, config, repeats=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in demo_workspace.model.state_dict().items())
    for name in ("selector_step", "selector_forward", "vanilla_step", "xcr_step", "forward", "scoring", "load"):
        assert getattr(units, name) > 0, name
    assert set(units.corruption) == {"gaussian_noise", "fog"} and all(v > 0 for v in units.corruption.values())
    e = estimate_xcr(demo_workspace, config, units)
    assert e.seconds > 0 and np.isfinite(e.seconds) and e.low < e.seconds < e.high
