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


def _run(seed, acc, recall, l1=0.0, l2=0.0):
    return {"seed": seed, "test_acc": acc, "per_class_recall": recall, "lambda1": l1, "lambda2": l2}


def test_treatment_verdicts_pair_treated_with_control_by_seed():
    from cfdebug.claims import treatment_verdicts

    sweep = {
        "best": {"lambda1": 1e-3, "lambda2": 2e-5},
        "control": [_run(1, 0.80, [0.7, float("nan")]), _run(0, 0.90, [0.9, float("nan")]), _run(2, 0.70, [0.6, float("nan")])],
        "runs": [_run(s, a + 0.02, [r + 0.05, float("nan")], 1e-3, 2e-5) for s, a, r in ((0, 0.9, 0.9), (1, 0.8, 0.7), (2, 0.7, 0.6))]
        + [_run(0, 0.1, [0.0, 0.0], 1e-2, 2e-5)],  # another pair: not the best, ignored
    }
    rows = treatment_verdicts(sweep, ["a", "b"])
    assert [r.metric for r in rows] == ["test_acc", "recall[a]"]  # class b has no test images (NaN)
    assert rows[0].difference == pytest.approx(0.02) and rows[0].verdict == "better" and rows[0].n_seeds == 3
    assert rows[0].baseline == "CE control" and "λ1=0.001" in rows[0].method
    with pytest.raises(CfdebugError, match="same seeds"):
        treatment_verdicts(sweep, ["a", "b"], lambda1=0.5, lambda2=0.5)


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
