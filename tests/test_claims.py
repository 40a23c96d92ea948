"""The claims behind `report`: review-budget flags, per-image scores, verdict rows end to end."""

import numpy as np
import pytest

from cfdebug.claims import budget_flags, detection_scores, run_claims
from cfdebug.errors import CfdebugError
from cfdebug.verdicts import VERDICTS


def test_budget_flags_take_the_lowest_scores_and_the_same_count():
    s = np.array([0.9, 0.1, 0.5, 0.1, 0.7, 0.3, 0.95, 0.2, 0.8, 0.6])
    flags = budget_flags(s, 0.25)  # ceil(2.5) = 3 predictions
    assert flags.sum() == 3
    assert set(np.flatnonzero(flags)) == {1, 3, 7}  # 0.1, 0.1 and 0.2
    assert budget_flags(s[::-1], 0.25).sum() == 3
    assert budget_flags(np.zeros(7), 0.01).sum() == 1  # at least one prediction
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(CfdebugError, match="budget"):
            budget_flags(s, bad)


def test_detection_scores_from_a_report():
    images = [
        {"confidence": 0.9, "agreement_margin": 0.2, "recall": 0.8, "f1": 0.7, "error": False},
        {"confidence": 0.6, "agreement_margin": -1.0, "recall": None, "f1": None, "error": True},
        {"confidence": 0.7, "agreement_margin": -0.1, "recall": 0.4, "f1": 0.5, "error": True},
    ]
    scores, msp, err = detection_scores({"images": images})
    assert msp.tolist() == [0.9, 0.6, 0.7] and err.tolist() == [False, True, True]
    assert scores["mc_recall"].tolist() == [0.8, 0.0, 0.4]  # unscorable counts as no agreement
    assert scores["mc_agreement"].tolist() == [0.2, -1.0, -0.1]
    assert scores["combined"].argmax() == 0 and scores["combined"].argmin() == 1


def test_run_claims_refuses_unknown_claims_and_no_seeds():
    with pytest.raises(CfdebugError, match="claims"):
        run_claims(None, ["detection", "magic"])
    with pytest.raises(CfdebugError, match="seed"):
        run_claims(None, ["detection"], [])


@pytest.mark.slow
def test_detection_and_treatment_claims_on_the_demo(demo_workspace):
    from cfdebug.config import TreatmentSchedule

    out = run_claims(demo_workspace, ["detection", "treatment"], [0, 1], n_boot=200,
                     treatment=TreatmentSchedule(epochs=1))
    rows = out["verdicts"]
    keys = {"claim", "metric", "baseline", "baseline_value", "method_value", "difference", "ci_low", "ci_high", "n_seeds", "verdict"}
    assert rows and all(keys <= set(r) for r in rows)
    assert all(r["verdict"] in VERDICTS for r in rows)
    det = [r for r in rows if r["claim"] == "detection"]
    assert {r["metric"] for r in det} == {"auroc", "aupr_err", "fpr_at_95tpr", "precision_at_budget"}
    assert all(r["n_seeds"] == 2 and r["n_images"] == out["detection"]["n_images"] and r["ci_low"] <= r["ci_high"] for r in det)
    treat = [r for r in rows if r["claim"] == "treatment"]
    assert treat[0]["metric"] == "test_acc" and treat[0]["baseline"] == "CE control" and treat[0]["n_seeds"] == 2
    assert len(out["detection"]["per_seed"]) == 2
    # the numbers are the runs' own: the treated − control test accuracy, per seed, averaged
    per_seed = out["treatment"]["per_seed"]
    differences = [r["treated_test_acc"] - r["control_test_acc"] for r in per_seed]
    assert treat[0]["difference"] == pytest.approx(np.mean(differences))
    assert (treat[0]["difference"] != 0) == any(d != 0 for d in differences)
    assert treat[0]["baseline_value"] == pytest.approx(np.mean([r["control_test_acc"] for r in per_seed]))
    # detection: MC agreement's AUROC vs MSP's, as each seed's detection report measured them
    auroc = next(r for r in det if r["method"] == "mc_agreement" and r["metric"] == "auroc")
    assert auroc["method_value"] == pytest.approx(np.mean([s["auroc"]["mc_agreement"] for s in out["detection"]["per_seed"]]))
    assert auroc["baseline_value"] == pytest.approx(out["detection"]["per_seed"][0]["auroc"]["msp"])


def _run(seed, acc, recall, l1=0.0, l2=0.0):
    return {"seed": seed, "test_acc": acc, "per_class_recall": recall, "lambda1": l1, "lambda2": l2}


def _sweep():
    """Three seeds; the best pair (1e-3, 2e-5) is 2 points above its control on every seed (and
    class a's recall 5 points), another pair is far below; control seeds are listed out of order."""
    return {
        "best": {"lambda1": 1e-3, "lambda2": 2e-5},
        "control": [_run(1, 0.80, [0.7, float("nan")]), _run(0, 0.90, [0.9, float("nan")]), _run(2, 0.70, [0.6, float("nan")])],
        "runs": [_run(s, a + 0.02, [r + 0.05, float("nan")], 1e-3, 2e-5) for s, a, r in ((0, 0.9, 0.9), (1, 0.8, 0.7), (2, 0.7, 0.6))]
        + [_run(s, 0.1, [0.0, 0.0], 1e-2, 2e-5) for s in (0, 1, 2)],
    }


def test_treatment_verdicts_compare_the_best_pair_with_the_control_of_the_same_seed():
    from cfdebug.claims import pair_runs, treatment_verdicts

    sweep = _sweep()
    assert [(r["seed"], r["lambda1"]) for r in pair_runs(sweep)] == [(0, 1e-3), (1, 1e-3), (2, 1e-3)]
    rows = treatment_verdicts(sweep, ["a", "b"])
    assert [r.metric for r in rows] == ["test_acc", "recall[a]"]  # class b has no test images (NaN)
    acc, recall = rows
    # the means of the runs themselves: treated (0.92 + 0.82 + 0.72) / 3, control (0.9 + 0.8 + 0.7) / 3
    assert acc.method_value == pytest.approx(0.82) and acc.baseline_value == pytest.approx(0.80)
    assert acc.difference == pytest.approx(0.02) and acc.n_seeds == 3
    # every seed's difference is exactly +0.02: a zero-width interval at +0.02, so "better"
    assert acc.ci_low == pytest.approx(0.02) and acc.ci_high == pytest.approx(0.02) and acc.verdict == "better"
    assert recall.method_value == pytest.approx(np.mean([0.95, 0.75, 0.65])) and recall.difference == pytest.approx(0.05)
    assert acc.baseline == "CE control" and acc.method == "treated (λ1=0.001, λ2=2e-05)"


def test_treatment_verdicts_of_a_named_pair_and_of_an_unchanged_model():
    from cfdebug.claims import treatment_verdicts

    sweep = _sweep()
    worse = treatment_verdicts(sweep, ["a", "b"], lambda1=1e-2, lambda2=2e-5)[0]
    assert worse.method_value == pytest.approx(0.1) and worse.difference == pytest.approx(0.1 - 0.8) and worse.verdict == "worse"
    # a treated model identical to its control: no difference, whatever the seeds
    same = {**sweep, "runs": [{**c, "lambda1": 1e-3, "lambda2": 2e-5} for c in sweep["control"]]}
    row = treatment_verdicts(same, ["a", "b"])[0]
    assert row.difference == 0.0 and row.verdict == "no detectable difference"
    # seeds that differ from run to run: paired per seed, so a treated run that is better on
    # every seed is better even though the seeds' levels differ more than the effect
    mixed = {**sweep, "runs": [_run(s, a + d, r, 1e-3, 2e-5) for (s, a, r), d in zip(((0, 0.9, [0.9, 0.1]), (1, 0.8, [0.7, 0.1]), (2, 0.7, [0.6, 0.1])), (0.02, 0.021, 0.019))]}
    row = treatment_verdicts(mixed, ["a", "b"])[0]
    assert row.difference == pytest.approx(0.02) and row.ci_low > 0 and row.verdict == "better"
    with pytest.raises(CfdebugError, match="same seeds"):
        treatment_verdicts(sweep, ["a", "b"], lambda1=0.5, lambda2=0.5)


def test_treatment_claim_sweeps_the_grids_on_the_schedule(monkeypatch):
    """The claim hands its schedule and grids to the sweep unchanged, judges the sweep's best
    pair, and reports the first treated run's config and the grid."""
    import cfdebug.treatment as treatment
    from cfdebug.claims import treatment_claim
    from cfdebug.config import TreatmentConfig, TreatmentSchedule, config_dict

    calls = {}

    def fake_sweep(ws, lambdas1, lambdas2, seeds, sets, progress=None, *, schedule=None, **_):
        calls.update(lambdas1=lambdas1, lambdas2=lambdas2, seeds=seeds, sets=sets, schedule=schedule)
        return {**_sweep(), "base": {"test_acc": 0.85}, "table2": []}

    monkeypatch.setattr(treatment, "training_sets", lambda ws, progress=None: "G")
    monkeypatch.setattr(treatment, "treatment_sweep", fake_sweep)
    ws = type("WS", (), {"data": type("D", (), {"classes": ["a", "b"]})()})()
    schedule = TreatmentSchedule(epochs=2)
    out = treatment_claim(ws, [0, 1, 2], schedule, lambdas1=[1e-3, 1e-2], lambdas2=[2e-5])
    assert calls == {"lambdas1": [1e-3, 1e-2], "lambdas2": [2e-5], "seeds": [0, 1, 2], "sets": "G", "schedule": schedule}
    assert out["comparisons"][0].difference == pytest.approx(0.02)
    assert out["grid"] == {"lambda1": [1e-3, 1e-2], "lambda2": [2e-5]}
    assert out["config"] == config_dict(TreatmentConfig(epochs=2, lambda1=1e-3, lambda2=2e-5, seed=0))
    assert [r["control_test_acc"] for r in out["per_seed"]] == [0.9, 0.8, 0.7]
    assert [r["treated_test_acc"] for r in out["per_seed"]] == pytest.approx([0.92, 0.82, 0.72])
    treatment_claim(ws, [4], schedule)  # no grids: TreatmentConfig's default pair
    assert (calls["lambdas1"], calls["lambdas2"], calls["seeds"]) == ([TreatmentConfig.lambda1], [TreatmentConfig.lambda2], [4])


def test_detection_verdicts_find_a_score_that_ranks_every_error_last():
    """Agreement ranks every error below every correct prediction; MSP is uninformative: the
    agreement score's AUROC is 1, MSP's 0.5 (hand-computed), and the difference is better."""
    from cfdebug.claims import detection_verdicts

    n = 40
    is_error = np.arange(n) % 4 == 0  # 10 errors
    msp = np.where(np.arange(n) // 4 % 2 == 0, 0.9, 0.6)  # blocks of 4 (one error, three correct) alternate: uninformative
    margin = np.where(is_error, -0.5, 0.3) + np.arange(n) * 1e-3
    images = [{"confidence": float(c), "agreement_margin": float(m), "recall": 0.5, "f1": 0.5, "error": bool(e)}
              for c, m, e in zip(msp, margin, is_error)]
    rows = {(r.method, r.metric): r for r in detection_verdicts([{"images": images}], budget=0.25, n_boot=200)}
    auroc = rows[("mc_agreement", "auroc")]
    assert auroc.method_value == pytest.approx(1.0) and auroc.baseline_value == pytest.approx(0.5)
    assert auroc.difference == pytest.approx(0.5) and auroc.verdict == "better" and auroc.n_images == n
    # the budget flags the 10 lowest: every error for the agreement; for MSP the first ten at 0.6
    # (ties by index: images 4–7, 12–15, 20, 21), of which 4, 12 and 20 are errors
    precision = rows[("mc_agreement", "precision_at_budget")]
    assert precision.method_value == pytest.approx(1.0) and precision.baseline_value == pytest.approx(0.3)
    # a constant score (recall 0.5 everywhere) cannot separate anything: AUROC 0.5
    assert rows[("mc_recall", "auroc")].method_value == pytest.approx(0.5)


def test_xcr_verdicts_lower_is_better_for_calibration():
    from cfdebug.claims import xcr_verdicts

    rows = []
    for s, shift in ((0, 0.01), (1, 0.02), (2, 0.015)):
        base = {"clean_acc": 0.9, "corrupt_acc": 0.7, "clean_ece": 0.10, "corrupt_ece": 0.20, "clean_nll": 0.4,
                "corrupt_nll": 1.0, "clean_brier": 0.2, "corrupt_brier": 0.4}
        rows.append({"method": "vanilla", "seed": s, **base})
        rows.append({"method": "xcr", "seed": s, **{k: v + shift for k, v in base.items()}})
    out = {r.metric: r for r in xcr_verdicts({"per_seed": rows})}
    assert out["clean_acc"].verdict == "better" and out["corrupt_ece"].verdict == "worse"
    assert len(out) == 8 and all(r.n_seeds == 3 for r in out.values())
    assert out["corrupt_ece"].method_value == pytest.approx(0.215) and out["corrupt_ece"].baseline_value == pytest.approx(0.20)
    assert all(r.difference == pytest.approx(0.015) and r.method == "XCR" and r.baseline == "vanilla" for r in out.values())
    assert not out["corrupt_nll"].higher_is_better and out["clean_acc"].higher_is_better
    # a run whose XCR numbers equal vanilla's gives no detectable difference anywhere
    same = [{**r, "method": m} for r in rows if r["method"] == "vanilla" for m in ("vanilla", "xcr")]
    assert {r.verdict for r in xcr_verdicts({"per_seed": same})} == {"no detectable difference"}
