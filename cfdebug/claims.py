"""The claims a user wants judged on one workspace, each method against its baseline.

* **detection**: does MC-filter agreement find the model's errors better than the maximum
  softmax probability (MSP)? Each agreement score (the one the flags use, the raw recall and F1,
  the combined score) vs MSP on the test predictions: AUROC, AUPR-Err, FPR at 95% TPR and the
  precision of a review budget (the lowest-scoring ``budget`` fraction of the test predictions,
  the same count for every score). Paired bootstrap over test images; CFE heads fitted per seed.
* **treatment**: does treatment (eq. 8, λ1/λ2) beat its plain cross-entropy fine-tuning control?
  Test accuracy and per-class recall, paired by seed.
* **xcr**: does XCR retraining beat vanilla retraining? Clean and corrupted accuracy, ECE, NLL and
  Brier, paired by seed.

:func:`run_claims` runs the chosen claims and returns the verdicts (``verdicts.Comparison``
dicts) and the tables behind them; ``python -m cfdebug report`` prints them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import numpy as np

from .config import CFEConfig, DetectConfig, MCFilterConfig, TreatmentConfig, TreatmentSchedule, config_dict
from .errors import CfdebugError
from .runtime import Progress, scaled_progress
from .store import jsonable
from .verdicts import Comparison, accuracy_comparisons, detection_comparisons, format_value, verdict_text

CLAIMS = ("detection", "treatment", "xcr", "revise")
#: What `report` runs without --claims (revise needs a declaration: a region or filters).
DEFAULT_CLAIMS = ("detection", "treatment", "xcr")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_BUDGET = 0.10
# Agreement scores compared with MSP (higher = more likely correct, like MSP).
DETECTION_SCORES = {
    "mc_agreement": "agreement margin (the score behind the flags)",
    "mc_recall": "raw recall of MC_x vs the class's global set",
    "mc_f1": "raw F1 of MC_x vs the class's global set",
    "combined": "mean percentile rank of MSP and the agreement margin",
}
XCR_METRICS = (("acc", True), ("ece", False), ("nll", False), ("brier", False))

__all__ = ["CLAIMS", "DEFAULT_SEEDS", "DEFAULT_BUDGET", "budget_flags", "detection_scores", "detection_claim", "verdicts_markdown",
           "report_markdown", "model_line", "replace_marked_section",
           "treatment_claim", "xcr_claim", "run_claims", "detection_verdicts", "pair_runs",
           "treatment_verdicts", "xcr_verdicts"]


def budget_flags(scores: np.ndarray, budget: float) -> np.ndarray:
    """The ``ceil(budget·N)`` lowest-scoring predictions of ``scores`` ``[N]`` (ties by index), as ``[N]`` bool.

    A review budget is a count a person can look at, so every score flags the same number of
    predictions and their precisions compare like for like. (A threshold carried over from the
    validation split does not do that when validation and test differ: on the biased demo the
    validation images carry the shortcut and test images do not, and such a threshold flagged
    287 of 539 test predictions for MSP at a 10% budget.) No label is used to choose the flags.
    """
    s = np.asarray(scores, float).reshape(-1)
    if not (isinstance(budget, (int, float)) and 0 < budget < 1):
        raise CfdebugError(f"Expected the review `budget` to be a fraction in (0, 1), but got {budget!r}.")
    n = max(1, int(np.ceil(budget * s.size)))
    flags = np.zeros(s.size, bool)
    flags[np.argsort(s, kind="stable")[:n]] = True
    return flags


def detection_scores(report: dict) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-image scores ``{name: [N]}``, MSP ``[N]`` and ``is_error`` ``[N]`` from a detection report."""
    from .detect import combined_score

    images = report["images"]
    msp = np.array([r["confidence"] for r in images], float)
    margin = np.array([r["agreement_margin"] for r in images], float)
    scores = {
        "mc_agreement": margin,
        "mc_recall": np.array([r["recall"] if r["recall"] is not None else 0.0 for r in images], float),
        "mc_f1": np.array([r["f1"] if r["f1"] is not None else 0.0 for r in images], float),
        "combined": combined_score(msp, margin),
    }
    return scores, msp, np.array([r["error"] for r in images], bool)


def detection_verdicts(reports: Sequence[dict], budget: float = DEFAULT_BUDGET, *, n_boot: int = 2000) -> list[Comparison]:
    """Each agreement score vs MSP from detection ``reports`` of the same test split (one per CFE seed).

    The images are resampled once for every score (paired bootstrap); several reports' scores are
    averaged per resample. One report (the dashboard's) gives an interval over images too.
    """
    if not reports:
        raise CfdebugError("Expected at least one detection report, but got none.")
    scores_by_seed, flags = {name: [] for name in DETECTION_SCORES}, {name: [] for name in DETECTION_SCORES}
    for report in reports:
        scores, msp, is_error = detection_scores(report)
        for name in DETECTION_SCORES:
            scores_by_seed[name].append(scores[name])
            flags[name].append(budget_flags(scores[name], budget))
    return detection_comparisons(
        {name: np.stack(v) for name, v in scores_by_seed.items()}, msp, is_error, baseline="msp",
        method_flags={name: np.stack(v) for name, v in flags.items()}, baseline_flags=budget_flags(msp, budget), n_boot=n_boot,
    )


def detection_claim(ws, seeds: Sequence[int] = DEFAULT_SEEDS, budget: float = DEFAULT_BUDGET, *,
                    n_boot: int = 2000, progress: Progress | None = None) -> dict:
    """MC agreement scores vs MSP over ``seeds`` CFE fits; see the module docstring."""
    from .detect import run_detection

    reports = []
    for i, seed in enumerate(seeds):
        cfg = DetectConfig(filters=MCFilterConfig(cfe=CFEConfig(seed=int(seed))))
        reports.append(run_detection(ws, cfg, scaled_progress(progress, i / len(seeds), (i + 1) / len(seeds), f"CFE seed {seed}: ")))
    per_seed = [{"seed": int(seed), "auroc": r["auroc"], "aupr_err": r["aupr_err"], "table1": r["table1"]} for seed, r in zip(seeds, reports)]
    return {"comparisons": detection_verdicts(reports, budget, n_boot=n_boot), "per_seed": per_seed, "budget": budget,
            "n_images": reports[0]["n_images"], "n_errors": reports[0]["total_errors"], "score_definitions": DETECTION_SCORES}


def pair_runs(sweep: dict, lambda1: float | None = None, lambda2: float | None = None) -> list[dict]:
    """The runs of one (λ1, λ2) pair of a treatment sweep, by seed; the sweep's ``best`` (chosen on
    validation) unless a pair is given."""
    best = sweep.get("best") or {}
    l1 = best.get("lambda1") if lambda1 is None else lambda1
    l2 = best.get("lambda2") if lambda2 is None else lambda2
    return sorted((r for r in sweep["runs"] if (r["lambda1"], r["lambda2"]) == (l1, l2)), key=lambda r: r["seed"])


def treatment_verdicts(sweep: dict, classes: Sequence[str], labels, lambda1: float | None = None, lambda2: float | None = None) -> list[Comparison]:
    """Treated vs its CE control from a :func:`~cfdebug.treatment.treatment_sweep` result, paired
    over seeds and test images (``labels`` [N], the test split's) by a bootstrap.

    The (λ1, λ2) pair is the sweep's ``best`` (chosen on validation) unless given. Test accuracy,
    then the recall of every class with test images.
    """
    runs = pair_runs(sweep, lambda1, lambda2)
    control = {r["seed"]: r for r in sweep["control"]}
    treated = {r["seed"]: r for r in runs}
    seeds = sorted(set(control) & set(treated))
    best = sweep.get("best") or {}
    l1 = best.get("lambda1") if lambda1 is None else lambda1
    l2 = best.get("lambda2") if lambda2 is None else lambda2
    if not seeds:
        raise CfdebugError(f"Expected treated and control runs with the same seeds for λ1={l1}, λ2={l2}, but found none.")
    return accuracy_comparisons(
        "treatment", [treated[s]["test_predictions"] for s in seeds], [control[s]["test_predictions"] for s in seeds], labels,
        classes, method=f"treated (λ1={l1:g}, λ2={l2:g})", baseline="CE control",
    )


def treatment_claim(ws, seeds: Sequence[int] = DEFAULT_SEEDS, schedule: TreatmentSchedule | None = None, *,
                    lambdas1: Sequence[float] | None = None, lambdas2: Sequence[float] | None = None,
                    progress: Progress | None = None) -> dict:
    """Treatment vs its CE control, paired by seed (test accuracy, per-class recall).

    ``schedule`` is what the runs share (default :class:`TreatmentSchedule`). With grids
    ``lambdas1 × lambdas2`` the pair is chosen on VALIDATION accuracy (mean over seeds;
    :func:`~cfdebug.treatment.treatment_sweep`), and only that pair is compared on test; a grid
    not given is :class:`TreatmentConfig`'s default weight. The result's ``config`` is the first
    treated run's :class:`TreatmentConfig`, ``grid`` the weights swept.
    """
    from .treatment import training_sets, treatment_sweep

    schedule = schedule or TreatmentSchedule()
    l1s, l2s = list(lambdas1 or [TreatmentConfig.lambda1]), list(lambdas2 or [TreatmentConfig.lambda2])
    sets = training_sets(ws, scaled_progress(progress, 0.0, 0.1))
    sweep = treatment_sweep(ws, l1s, l2s, list(seeds), sets, scaled_progress(progress, 0.1, 1.0), schedule=schedule)
    config = schedule.with_lambdas(l1s[0], l2s[0], int(seeds[0]))
    best = sweep["best"]
    control = sorted(sweep["control"], key=lambda r: r["seed"])
    treated = pair_runs(sweep)
    return {"comparisons": treatment_verdicts(sweep, ws.data.classes, ws.data.splits["test"].labels), "base": {"test_acc": sweep["base"]["test_acc"]},
            "table2": sweep["table2"], "config": config_dict(config), "best": best, "grid": {"lambda1": l1s, "lambda2": l2s},
            "per_seed": [{"seed": c["seed"], "control_test_acc": c["test_acc"], "treated_test_acc": t["test_acc"]}
                         for c, t in zip(control, treated)]}


def xcr_verdicts(result: dict, arrays: dict, method: str = "xcr", baseline: str = "vanilla") -> list[Comparison]:
    """XCR vs vanilla retraining, paired over seeds and test images (clean, and the same images
    under every corruption), from an XCR report and its per-image terms
    (:func:`~cfdebug.xcr.report.per_image_scores`)."""
    from .verdicts import image_comparison

    variants = result["per_image"]["variants"]
    mi, bi = variants.index(method), variants.index(baseline)
    name = method.upper() if method == "xcr" else method
    out = []
    for split in ("clean", "corrupt"):
        if arrays[f"{split}_correct"].shape[-1] == 0 or (split == "corrupt" and arrays["corrupt_correct"].shape[2] == 0):
            continue
        for metric, higher in XCR_METRICS:
            key = f"{split}_{metric}"
            field = {"acc": "correct", "ece": "correct", "nll": "nll", "brier": "brier"}[metric]
            extra = {}
            if metric == "ece":
                extra = {"statistic": "ece", "method_confidences": arrays[f"{split}_confidence"][mi],
                         "baseline_confidences": arrays[f"{split}_confidence"][bi]}
            elif metric == "acc" and split == "clean":
                extra = {"method_predictions": arrays["clean_prediction"][mi], "baseline_predictions": arrays["clean_prediction"][bi]}
            out.append(image_comparison("xcr", key, arrays[f"{split}_{field}"][mi], arrays[f"{split}_{field}"][bi], method=name,
                                        baseline=baseline, higher_is_better=higher, **extra))
    return out


def xcr_claim(ws, seeds: Sequence[int] = DEFAULT_SEEDS, config=None, *, progress: Progress | None = None) -> dict:
    """XCR retraining vs vanilla retraining, paired over seeds and test images, clean and corrupted."""
    from .xcr import default_xcr_config, run_xcr_report
    from .xcr.report import per_image_scores

    config = replace(config or default_xcr_config(ws.config), seeds=tuple(int(s) for s in seeds))
    result = run_xcr_report(ws, config, progress)
    comparisons = xcr_verdicts(result, per_image_scores(ws, config, result))
    return {"comparisons": comparisons, "table1": result["table1"], "table2": result["table2"],
            "per_seed": result["per_seed"], "settings": result.get("settings")}


def revise_verdicts(result: dict, labels, classes: Sequence[str], flagged=None) -> list[Comparison]:
    """A revise method vs its CE control (:func:`~cfdebug.revise.revise_sweep`'s result), paired
    over seeds and test images (``labels`` [N]): test accuracy and per-class recall; with a region
    the Grad-CAM share inside it (lower is better) and the accuracy on the wrong-class copy; with the
    base model's ``flagged`` [N] bool (its review-budget flags) the share of those still wrong."""
    from .verdicts import image_comparison

    y = np.asarray(labels)
    method, control = result["method"], result["control"]
    decl = result["declaration"]
    name = decl["method"] + (f" (fill {result['fill']})" if result.get("fill") else "")
    mp = np.array([r["test_predictions"] for r in method])  # [S or 1, N]
    cp = np.array([r["test_predictions"] for r in control])  # [S, N]
    out = accuracy_comparisons("revise", mp, cp, y, classes, method=name, baseline="CE control")
    common = {"method": name, "baseline": "CE control"}
    if decl.get("region") is not None:
        out.append(image_comparison("revise", "cam_in_region", [r["cam_share"] for r in method], [r["cam_share"] for r in control],
                                    higher_is_better=False, **common))
        wm = np.array([r["wrong_region_predictions"] for r in method])
        wc = np.array([r["wrong_region_predictions"] for r in control])
        out.append(image_comparison("revise", "wrong_region_acc", (wm == y).astype(float), (wc == y).astype(float),
                                    method_predictions=wm, baseline_predictions=wc, **common))
    if flagged is not None and np.any(flagged):
        f = np.asarray(flagged, bool)
        out.append(image_comparison("revise", "flagged_still_wrong", (mp[:, f] != y[f]).astype(float), (cp[:, f] != y[f]).astype(float),
                                    higher_is_better=False, method_predictions=mp[:, f], baseline_predictions=cp[:, f], **common))
    return out


def revise_claim(ws, seeds: Sequence[int] = DEFAULT_SEEDS, *, method: str, region=None, filters: Sequence[int] | None = None,
                 config=None, budget: float = DEFAULT_BUDGET, progress: Progress | None = None, controls: dict | None = None) -> dict:
    """A revise method vs the same CE control on ``ws``; see :func:`revise_verdicts` (``controls``:
    control runs shared between methods, :func:`~cfdebug.revise.revise_sweep`)."""
    from .detect import run_detection
    from .revise import declare, revise_sweep

    decl = declare(ws, method, region, filters)
    report = run_detection(ws, progress=scaled_progress(progress, 0.0, 0.05, "detection on the base model: "))
    scores, _, _ = detection_scores(report)
    flagged = budget_flags(scores["mc_agreement"], budget)
    result = revise_sweep(ws, decl, seeds, config, progress=scaled_progress(progress, 0.05, 1.0), controls=controls)
    comparisons = revise_verdicts(result, ws.data.splits["test"].labels, ws.data.classes, flagged)
    return {"comparisons": comparisons, **{k: result[k] for k in ("declaration", "config", "fill", "fill_scores")},
            "summary": revise_summary(result, ws.data.input_size), "flagged": int(flagged.sum()), "budget": budget}


def revise_summary(result: dict, input_size: int) -> list[dict]:
    """One row per model (base, control and method per seed): what chose it and what it does."""
    from .revise import parse_region

    region = parse_region(result["declaration"].get("region"))
    share = region.area_share(input_size) if region is not None else None
    rows = []
    for part, records in (("base", [result["base"]]), ("control", result["control"]), ("method", result["method"])):
        for r in records:
            row = {"model": part, "seed": r.get("seed"), "fill": r.get("fill"), "best_epoch": r.get("best_epoch"),
                   "cf_val_acc": r.get("val_acc"), "plain_val_acc": r.get("plain_val_acc"), "test_acc": r["test_acc"]}
            if region is not None:
                row.update(cam_share=r["cam_share_mean"], cam_over_area=r["cam_share_mean"] / share, wrong_region_acc=r["wrong_region_acc"],
                           wrong_minus_test=r["wrong_region_acc"] - r["test_acc"])
            rows.append(row)
    return rows


def run_claims(ws, claims: Sequence[str] = DEFAULT_CLAIMS, seeds: Sequence[int] = DEFAULT_SEEDS, *, budget: float = DEFAULT_BUDGET,
               treatment: TreatmentSchedule | None = None, lambdas1: Sequence[float] | None = None,
               lambdas2: Sequence[float] | None = None, xcr=None, n_boot: int = 2000,
               revise: Sequence[dict] | None = None, progress: Progress | None = None) -> dict:
    """Run ``claims`` on ``ws`` and return ``{"verdicts": [Comparison dicts], <claim>: tables, "seconds"}``.

    ``treatment`` is the treatment claim's schedule and ``lambdas1``/``lambdas2`` its grids
    (:func:`treatment_claim`); ``xcr`` the XCR claim's config (:func:`xcr_claim`); ``revise`` the
    declarations the ``revise`` claim judges, each ``{"method", "region", "filters"[, "config"]}``
    (:func:`revise_claim`'s arguments).
    """
    unknown = [c for c in claims if c not in CLAIMS]
    if unknown or not claims:
        raise CfdebugError(f"Expected `claims` from {', '.join(CLAIMS)}, but got {', '.join(map(str, unknown)) or 'none'}.")
    if not seeds:
        raise CfdebugError("Expected at least one seed, but got none.")
    if "revise" in claims and not revise:
        raise CfdebugError("Expected at least one revise method to judge (a method with its --region or --filters), but got none.")
    start, out, verdicts = time.perf_counter(), {}, []
    runners = {
        "detection": lambda p: detection_claim(ws, seeds, budget, n_boot=n_boot, progress=p),
        "treatment": lambda p: treatment_claim(ws, seeds, treatment, lambdas1=lambdas1, lambdas2=lambdas2, progress=p),
        "xcr": lambda p: xcr_claim(ws, seeds, xcr, progress=p),
        "revise": lambda p: _revise_claims(ws, seeds, revise, budget, p),
    }
    for i, claim in enumerate(claims):
        result = runners[claim](scaled_progress(progress, i / len(claims), (i + 1) / len(claims), f"{claim}: "))
        comparisons: list[Comparison] = result.pop("comparisons")
        verdicts += [c.as_dict() for c in comparisons]
        out[claim] = result
    model = {"accuracy": (ws.model_meta or {}).get("accuracy"), "source": (ws.model_meta or {}).get("source")}
    return jsonable({"verdicts": verdicts, **out, "seeds": [int(s) for s in seeds], "claims": list(claims), "model": model,
                     "workspace": config_dict(ws.config), "seconds": time.perf_counter() - start})


def _revise_claims(ws, seeds, declarations: Sequence[dict], budget: float, progress) -> dict:
    """Every declared revise method against the same control (one :func:`revise_claim` each)."""
    runs, comparisons, controls = [], [], {}
    for i, d in enumerate(declarations):
        part = scaled_progress(progress, i / len(declarations), (i + 1) / len(declarations), f"{d['method']}: ")
        one = revise_claim(ws, seeds, method=d["method"], region=d.get("region"), filters=d.get("filters"), config=d.get("config"),
                           budget=budget, progress=part, controls=controls)
        comparisons += one.pop("comparisons")
        runs.append(one)
    return {"comparisons": comparisons, "runs": runs}


# --------------------------------------------------------------------------------------------
# Markdown (docs/RESULTS.md and the README's results section, regenerated by `make results`)
# --------------------------------------------------------------------------------------------


# The rows the README shows (docs/RESULTS.md shows every row).
HEADLINE_ROWS = {
    ("detection", "mc_agreement", "auroc"), ("detection", "mc_agreement", "precision_at_budget"),
    ("detection", "combined", "auroc"), ("treatment", None, "test_acc"),
    ("xcr", None, "clean_acc"), ("xcr", None, "corrupt_acc"), ("xcr", None, "corrupt_ece"), ("xcr", None, "corrupt_nll"),
    ("revise", None, "test_acc"), ("revise", None, "cam_in_region"), ("revise", None, "wrong_region_acc"),
}


def _is_headline(row: dict) -> bool:
    """True for the few rows that summarise each claim (:data:`HEADLINE_ROWS`)."""
    return (row["claim"], row["method"], row["metric"]) in HEADLINE_ROWS or (row["claim"], None, row["metric"]) in HEADLINE_ROWS


def verdicts_markdown(verdicts: Sequence[dict], headline_only: bool = False) -> str:
    """A Markdown verdict table: metric, method, baseline, values, difference with its 95% CI, verdict."""
    lines = ["| claim | metric | method | baseline | method value | baseline value | difference [95% CI] | paired by | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in verdicts:
        if headline_only and not _is_headline(r):
            continue
        ci = f"{format_value(r['difference'], signed=True)} [{format_value(r['ci_low'], signed=True)}, {format_value(r['ci_high'], signed=True)}]"
        paired = f"{r['n_seeds']} seed{'s' if r['n_seeds'] != 1 else ''}" + (f" × {r['n_images']} images" if r.get("n_images") else "")
        text = verdict_text(r)
        verdict = f"**{r['verdict']}**{text[len(r['verdict']):]}"
        lines.append(f"| {r['claim']} | {r['metric']} | {r['method']} | {r['baseline']} | {format_value(r['method_value'])} | "
                     f"{format_value(r['baseline_value'])} | {ci} | {paired} | {verdict} |")
    return "\n".join(lines)


def model_line(result: dict) -> str:
    """One sentence with the judged model's train/val/test accuracy, when the workspace knows it."""
    acc = (result.get("model") or {}).get("accuracy")
    if not acc:
        return "Model accuracy: not recorded (a model loaded from a checkpoint)."
    return "Model accuracy: " + ", ".join(f"{split} {100 * acc[split]:.1f}%" for split in ("train", "val", "test") if split in acc) + "."


def report_markdown(result: dict, title: str, command: str) -> str:
    """One workspace's section of docs/RESULTS.md: the command, the verdict table, the tables behind it."""
    parts = [f"### {title}", "", f"`{command}` ({result['seconds']:.0f} s on this machine; seeds {', '.join(map(str, result['seeds']))})", "",
             model_line(result), "", verdicts_markdown(result["verdicts"])]
    det = result.get("detection")
    if det:
        parts += ["", f"Detection: {det['n_errors']} errors among {det['n_images']} test predictions; review budget "
                  f"{det['budget']:.0%} of them. Per CFE seed, AUROC:", "",
                  "| CFE seed | " + " | ".join(det["per_seed"][0]["auroc"]) + " |",
                  "|---" * (1 + len(det["per_seed"][0]["auroc"])) + "|"]
        parts += [f"| {r['seed']} | " + " | ".join(format_value(v) for v in r["auroc"].values()) + " |" for r in det["per_seed"]]
    treat = result.get("treatment")
    if treat:
        best = treat.get("best") or {}
        parts += ["", f"Treatment: base model test accuracy {format_value(treat['base']['test_acc'])}. Every (λ1, λ2) and the control, "
                  f"mean ± std over seeds; the pair compared above (λ1={best.get('lambda1')}, λ2={best.get('lambda2')}) is the best "
                  "on validation accuracy, test never chose it:", "",
                  "| run | λ1 | λ2 | val acc | test acc |", "|---|---|---|---|---|"]
        for r in treat["table2"]:
            name = {"base": "base", "fine-tuned": "control (CE fine-tune)"}.get(r["model"], "treated")
            l1 = "-" if r["model"] != "treatment" else f"{r['lambda1']:g}"
            l2 = "-" if r["model"] != "treatment" else f"{r['lambda2']:g}"
            parts.append(f"| {name} | {l1} | {l2} | {format_value(r['val_acc_mean'])} ± {format_value(r['val_acc_std'])} | "
                         f"{format_value(r['test_acc_mean'])} ± {format_value(r['test_acc_std'])} |")
    xcr = result.get("xcr")
    if xcr:
        parts += ["", f"XCR ({xcr.get('settings') or ''}). Table 1 (explanations, test split):", "",
                  "| method | k | β | accuracy | Avg Drop | Avg Inc |", "|---|---|---|---|---|---|"]
        parts += [f"| {r.get('mode')} | {r.get('k')} | {r.get('beta') if r.get('beta') is not None else '-'} | {format_value(r.get('accuracy'))} | "
                  f"{format_value(r.get('avg_drop'))} | {format_value(r.get('avg_inc'))} |" for r in xcr["table1"]]
    for run in (result.get("revise") or {}).get("runs", []):
        parts += ["", *_revise_markdown(run)]
    return "\n".join(parts) + "\n"


def _revise_markdown(run: dict) -> list[str]:
    """One revise method's models in docs/RESULTS.md: what chose each epoch and what each model does."""
    decl = run["declaration"]
    what = ", ".join(f"{k} {v}" for k, v in (("region", decl.get("region")), ("filters", decl.get("filters"))) if v)
    fill = (f"; fill chosen on counterfactual validation: {run['fill']}" if run.get("fill_scores") else f"; fill {run['fill']}") if run.get("fill") else ""
    head = [f"Revise, {decl['method']} ({what or 'no region or filters'}{fill}). Every model's epoch was chosen on counterfactual "
            "validation (cf val); test never chose anything:", ""]
    cols = [c for c in ("model", "seed", "best_epoch", "cf_val_acc", "plain_val_acc", "test_acc", "cam_over_area", "wrong_region_acc")
            if c in run["summary"][0]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in run["summary"]:
        lines.append("| " + " | ".join(format_value(row.get(c)) if isinstance(row.get(c), float) else str(row.get(c) if row.get(c) is not None else "-")
                                       for c in cols) + " |")
    return head + lines


def replace_marked_section(text: str, name: str, body: str) -> str:
    """``text`` with the lines between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced by ``body``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise CfdebugError(f"Expected the markers {start} and {end} in the file, but they are missing.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body.rstrip()}\n{end}{tail}"
