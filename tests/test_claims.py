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


def _run(seed, predictions, l1=0.0, l2=0.0):
    return {"seed": seed, "test_predictions": list(predictions), "lambda1": l1, "lambda2": l2}


def test_treatment_verdicts_pair_treated_with_control_over_seeds_and_images():
    from cfdebug.claims import treatment_verdicts

    rng = np.random.default_rng(0)
    labels = np.zeros(300, int)  # class b has no test image
    control = {s: np.where(rng.random(300) < 0.8, 0, 1) for s in range(3)}
    # The treated runs fix 30 of the control's errors on every seed and break none.
    treated = {s: np.where(np.isin(np.arange(300), np.flatnonzero(p == 1)[:30]), 0, p) for s, p in control.items()}
    sweep = {
        "best": {"lambda1": 1e-3, "lambda2": 2e-5},
        "control": [_run(s, control[s]) for s in (1, 0, 2)],
        "runs": [_run(s, treated[s], 1e-3, 2e-5) for s in range(3)] + [_run(0, np.ones(300, int), 1e-2, 2e-5)],  # not the best pair
    }
    rows = treatment_verdicts(sweep, ["a", "b"], labels)
    assert [r.metric for r in rows] == ["test_acc", "recall[a]"]  # class b has no test images
    assert rows[0].difference == pytest.approx(30 / 300) and rows[0].verdict == "better" and rows[0].n_seeds == 3
    assert rows[0].n_images == 300 and rows[0].changed == 30
    assert rows[0].baseline == "CE control" and "λ1=0.001" in rows[0].method
    same = treatment_verdicts({**sweep, "runs": [_run(s, control[s], 1e-3, 2e-5) for s in range(3)]}, ["a", "b"], labels)
    assert same[0].ci_low == same[0].ci_high == 0 and same[0].note == "identical predictions: the method changed nothing"
    with pytest.raises(CfdebugError, match="same seeds"):
        treatment_verdicts(sweep, ["a", "b"], labels, lambda1=0.5, lambda2=0.5)


def _sweep(n: int = 200):
    """Three seeds on ``n`` test images of class a (labels 0): the best pair (1e-3, 2e-5) fixes 4
    of its control's errors on every seed and breaks none, another pair is wrong everywhere;
    control seeds are listed out of order. Returns ``(sweep, labels)``."""
    rng = np.random.default_rng(7)
    labels = np.zeros(n, int)
    control = {s: np.where(rng.random(n) < 0.8, 0, 1) for s in (1, 0, 2)}
    treated = {s: np.where(np.isin(np.arange(n), np.flatnonzero(p == 1)[:4]), 0, p) for s, p in control.items()}
    sweep = {
        "best": {"lambda1": 1e-3, "lambda2": 2e-5},
        "control": [{**_run(s, control[s]), "test_acc": float(np.mean(control[s] == 0))} for s in (1, 0, 2)],
        "runs": [{**_run(s, treated[s], 1e-3, 2e-5), "test_acc": float(np.mean(treated[s] == 0))} for s in (0, 1, 2)]
        + [{**_run(s, np.ones(n, int), 1e-2, 2e-5), "test_acc": 0.0} for s in (0, 1, 2)],
    }
    return sweep, labels


def test_treatment_claim_sweeps_the_grids_on_the_schedule(monkeypatch):
    """The claim hands its schedule and grids to the sweep unchanged, judges the sweep's best
    pair, and reports the first treated run's config and the grid."""
    import cfdebug.treatment as treatment
    from cfdebug.claims import treatment_claim
    from cfdebug.config import TreatmentConfig, TreatmentSchedule, config_dict

    calls = {}
    sweep, labels = _sweep()

    def fake_sweep(ws, lambdas1, lambdas2, seeds, sets, progress=None, *, schedule=None, **_):
        calls.update(lambdas1=lambdas1, lambdas2=lambdas2, seeds=seeds, sets=sets, schedule=schedule)
        return {**sweep, "base": {"test_acc": 0.85}, "table2": []}

    monkeypatch.setattr(treatment, "training_sets", lambda ws, progress=None: "G")
    monkeypatch.setattr(treatment, "treatment_sweep", fake_sweep)
    split = type("S", (), {"labels": labels})()
    ws = type("WS", (), {"data": type("D", (), {"classes": ["a", "b"], "splits": {"test": split}})()})()
    schedule = TreatmentSchedule(epochs=2)
    out = treatment_claim(ws, [0, 1, 2], schedule, lambdas1=[1e-3, 1e-2], lambdas2=[2e-5])
    assert calls == {"lambdas1": [1e-3, 1e-2], "lambdas2": [2e-5], "seeds": [0, 1, 2], "sets": "G", "schedule": schedule}
    assert out["comparisons"][0].difference == pytest.approx(4 / 200)
    assert out["grid"] == {"lambda1": [1e-3, 1e-2], "lambda2": [2e-5]}
    assert out["config"] == config_dict(TreatmentConfig(epochs=2, lambda1=1e-3, lambda2=2e-5, seed=0))
    control = {r["seed"]: r["test_acc"] for r in sweep["control"]}
    assert [r["control_test_acc"] for r in out["per_seed"]] == [control[0], control[1], control[2]]
    assert [r["treated_test_acc"] - r["control_test_acc"] for r in out["per_seed"]] == pytest.approx([4 / 200] * 3)
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


def test_xcr_verdicts_pair_images_and_lower_is_better_for_calibration():
    from cfdebug.claims import xcr_verdicts

    rng = np.random.default_rng(1)
    v, seeds, g, n = 4, 3, 2, 400  # variants vanilla, vanilla+TS, xcr, xcr+TS
    correct = (rng.random((v, seeds, n)) < 0.85).astype(float)
    correct[2] = np.maximum(correct[0], (rng.random((seeds, n)) < 0.3))  # xcr: right wherever vanilla is, and more
    conf = np.clip(correct * 0.5 + 0.4 + 0.05 * rng.random((v, seeds, n)), 0, 1)
    conf[2] = np.clip(conf[0] + 0.3, 0, 1)  # xcr: over-confident
    nll = np.where(correct > 0, 0.2, 2.0)
    arrays = {"clean_correct": correct, "clean_confidence": conf, "clean_nll": nll, "clean_brier": nll / 2,
              "clean_prediction": np.where(correct > 0, 0, 1),
              "corrupt_correct": np.repeat(correct[:, :, None], g, 2), "corrupt_confidence": np.repeat(conf[:, :, None], g, 2),
              "corrupt_nll": np.repeat(nll[:, :, None], g, 2), "corrupt_brier": np.repeat(nll[:, :, None], g, 2) / 2}
    result = {"per_image": {"variants": ["vanilla", "vanilla+TS", "xcr", "xcr+TS"], "sets": [["fog", 3], ["snow", 3]]}}
    out = {r.metric: r for r in xcr_verdicts(result, arrays)}
    assert len(out) == 8 and all(r.n_seeds == 3 and r.n_images == n for r in out.values())
    assert out["clean_acc"].verdict == "better" and out["corrupt_acc"].verdict == "better"
    assert out["clean_nll"].verdict == "better" and out["clean_nll"].difference < 0  # lower NLL is better
    assert out["clean_acc"].difference == pytest.approx((correct[2] - correct[0]).mean())
    assert out["corrupt_ece"].method_value == pytest.approx(out["clean_ece"].method_value)
