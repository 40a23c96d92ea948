"""Flagged predictions: test images whose filters disagree with their class's, with Grad-CAM."""

import numpy as np
import pandas as pd
import streamlit as st

from cfdebug import metrics, ui, viz
from cfdebug.claims import DEFAULT_BUDGET, DEFAULT_SEEDS, budget_flags
from cfdebug.detect import combined_score, flags_at_margin
from cfdebug.ui import browser as bui
from cfdebug.ui import verdicts as verdict_ui
from cfdebug.ui.filters import gradcam_layer_note

st.header("Flagged predictions")
ws = ui.workspace_page()
classes = ui.class_names(ws)
result = ui.detection(ws)
images = pd.DataFrame(result["images"])
skip = result["config"]["skip_threshold"]

st.caption(
    "Each test prediction's local MC filters (from the predicted class's CFE head) are compared with that class's "
    "global MC filters. By default the lowest-scoring share of test predictions is flagged for review (a budget); "
    "the paper's rule flags a prediction when its agreement is below the class's mean on training images "
    f"(predictions with confidence above {skip:.0%} are not checked). Thresholds come from training data only."
)

with st.expander("Table 1: misclassification detection", expanded=True):
    rows = [
        {"metric": r["label"], "skip thr.": f"{r['skip_threshold']:.0%}", "freq. thr.": f"{r['freq_threshold']:.0%}",
         "errors detected": f"{r['errors_detected']} ({r['errors_detected_pct']:.0f}%)", "new errors": r["new_errors"]}
        for r in result["table1"]
    ]
    st.markdown(f"**Total errors: {result['total_errors']}** of {result['n_images']} test images")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(f"Re-ranking the top-{result['rerank_top_k']} classes by agreement fixes {result['rerank_fixed']} flagged errors.")

st.subheader("Detection quality")
is_error = images["error"].to_numpy(bool)
scores = {
    "MC agreement": images["agreement_margin"].to_numpy(float),
    "max softmax (MSP)": images["confidence"].to_numpy(float),
}
scores["combined"] = combined_score(scores["max softmax (MSP)"], scores["MC agreement"])
left, right = st.columns([3, 2])
if 0 < is_error.sum() < len(is_error):
    curves = {}
    for name, s in scores.items():
        c = metrics.error_detection_curve(s, is_error)
        curves[name] = (c["fpr"], c["tpr"], metrics.error_detection_scores(s, is_error)["auroc"])
    left.plotly_chart(viz.roc_figure(curves, "Error detection ROC (CFE seed 0)"), width="stretch")
else:
    left.info("Detection curves need at least one error and one correct prediction.")
margin = scores["MC agreement"]
kept = bui.chosen_flag_rule()  # the rule chosen before, when the URL does not say (a page switch drops it)
if "rule" not in st.query_params:
    st.query_params.update({"rule": kept[0], **({"budget": f"{round(100 * kept[1])}"} if kept[0] == "budget" else {"threshold": f"{kept[1]:g}"})})
rule = right.radio(
    "Flag rule", ["Review budget", "Paper rule"], horizontal=True,
    index=0 if st.query_params.get("rule", "budget") == "budget" else 1,
    help="Review budget: the lowest-scoring share of test predictions, what a person can look at. "
         "Paper rule: agreement below the class's mean on training images (Table 1), with a movable threshold.",
)
if rule == "Review budget":
    wanted = st.query_params.get("budget")
    budget = right.slider("Budget (% of test predictions)", 1, 50, int(wanted) if wanted and wanted.isdigit() and 1 <= int(wanted) <= 50 else round(100 * DEFAULT_BUDGET),
                          help="The same number of predictions is flagged by the agreement score and by MSP, so their precisions compare like for like.")
    st.query_params.update(rule="budget", budget=str(budget))
    st.query_params.pop("threshold", None)
    flagged = budget_flags(margin, budget / 100)
    checked = np.ones_like(flagged)
    msp_flagged = budget_flags(scores["max softmax (MSP)"], budget / 100)
    precision = (flagged & is_error).sum() / max(flagged.sum(), 1)
    msp_precision = (msp_flagged & is_error).sum() / max(msp_flagged.sum(), 1)
    right.metric("Precision of the flags (errors among flagged)", f"{precision:.0%}", f"{100 * (precision - msp_precision):+.0f} pts vs MSP at the same budget", delta_color="off",
                 help=f"MSP flags its {int(msp_flagged.sum())} least confident predictions: {msp_precision:.0%} of them are errors.")
else:
    lo, hi = float(np.floor(margin.min() * 20) / 20), float(np.ceil(margin.max() * 20) / 20)
    try:
        start = min(max(round(float(st.query_params.get("threshold", 0.0)), 2), lo), hi)
    except ValueError:
        start = 0.0
    threshold = right.slider(
        "Flag when agreement − class mean is below", lo, hi, start, 0.01,
        help="0 is the paper's rule (below the class's mean training agreement). Lower flags fewer, more certain errors.",
    )
    st.query_params.update(rule="paper", threshold=f"{threshold:g}")
    st.query_params.pop("budget", None)
    flags = flags_at_margin(result, threshold)
    checked, flagged = flags["checked"], flags["flagged"]
if rule == "Review budget":  # kept for the other pages that show flags (the Sample browser, Treatment)
    bui.choose_flag_rule("budget", budget / 100)
else:
    bui.choose_flag_rule("paper", threshold)
detected = int((flagged & is_error).sum())
right.metric("Errors detected", f"{detected} of {int(is_error.sum())}", f"{100 * detected / max(is_error.sum(), 1):.0f}%", delta_color="off")
right.metric("New errors (correct but flagged)", int((flagged & ~is_error).sum()))
right.metric("Flagged", int(flagged.sum()), help=f"of {int(checked.sum())} checked predictions")
if images["unscorable"].any():
    right.warning(f"{int(images['unscorable'].sum())} predictions are unscorable: their class has no global MC filters.")

if 0 < is_error.sum() < len(is_error):
    seeds = ", ".join(map(str, DEFAULT_SEEDS))
    rows = verdict_ui.detection(ws, (budget / 100) if rule == "Review budget" else DEFAULT_BUDGET)
    if rows:
        verdict_ui.show([r for r in rows if r["method"] in ("mc_agreement", "combined")],
                        title=f"Does MC agreement find errors better than MSP? (CFE seeds {seeds}, as `python -m cfdebug report`)",
                        key="detection_verdicts")
        st.caption(f"The verdict averages the agreement scores of {len(DEFAULT_SEEDS)} CFE fits (seeds {seeds}) per test image; the "
                   "curves, counts and gallery on this page are those of seed 0.")

st.subheader("Gallery")
st.caption("Flagged predictions, lowest agreement first, with Grad-CAM toward the predicted class. Caption: ✓/✗ whether the "
           "prediction is right, true and predicted class, confidence, and **→ c**: the class proposed by re-ranking the "
           f"top-{result['rerank_top_k']} classes by agreement (the paper's fix; equal to the prediction when no other class agrees better). "
           "**open** shows one below.")
images["flagged_now"] = flagged
shown = images[flagged].sort_values("agreement_margin", kind="stable")
PER_PAGE = 16
pages = max(1, -(-len(shown) // PER_PAGE))
a, b = st.columns([1, 3])
page_no = a.number_input(f"Page (of {pages}, {PER_PAGE} per page)", 1, pages, 1, key=f"gallery-page-{len(shown)}")
b.caption(f"**{len(shown)}** flagged predictions; this page shows {min((page_no - 1) * PER_PAGE + 1, len(shown))}–"
          f"{min(page_no * PER_PAGE, len(shown))}.")
page = shown.iloc[(page_no - 1) * PER_PAGE : page_no * PER_PAGE]
if page.empty:
    st.info("No prediction is flagged at this threshold.")
else:
    overlays = ui.gradcam_overlays(ws, "test", page.index.to_numpy(), page["predicted"].to_numpy())
    gradcam_layer_note(ws)
    for start in range(0, len(page), 8):
        grid = st.columns(8)
        for j, (i, row) in enumerate(list(page.iterrows())[start : start + 8]):
            mark = "✗" if row["error"] else "✓"
            grid[j].image(overlays[start + j], width="stretch")
            if grid[j].button("open", key=f"open-flagged-{row['id']}", width="stretch"):
                st.query_params["image"] = row["id"]
            grid[j].caption(f"{mark} true {classes[row['true']]} · pred {classes[row['predicted']]} ({row['confidence']:.2f}) → {classes[row['proposed']]}")

    st.subheader("One prediction")
    ids = shown["id"].tolist()
    wanted = st.query_params.get("image")
    pick = st.selectbox("Image (flagged predictions, lowest agreement first)", ids, index=ids.index(wanted) if wanted in ids else 0,
                        key=f"one-{wanted}")
    if st.query_params.get("image") != pick:
        st.query_params["image"] = pick
    row = shown[shown["id"] == pick].iloc[0]
    i, pred = int(shown.index[shown["id"] == pick][0]), int(row["predicted"])
    filters = ui.global_filters(ws)
    local = ui.local_masks(ws, "test", [i], [pred])[0]
    global_set = filters.sets(result["config"]["freq_threshold"])[pred]
    freq = filters.histogram[pred] / max(filters.histogram[pred].max(), 1)
    a, b, c = st.columns([1, 1, 3])
    a.image(ui.sample_images(ws, "test", [i])[0], caption="image", width="stretch")
    b.image(ui.gradcam_overlays(ws, "test", [i], [pred])[0], caption=f"Grad-CAM toward {classes[pred]}", width="stretch")
    a.markdown(f"true **{classes[row['true']]}** · predicted **{classes[pred]}** ({row['confidence']:.2f}) · proposed **{classes[row['proposed']]}**")
    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.2f}"  # noqa: E731 (None/NaN: unscorable)
    b.markdown(f"filter-set overlap: recall {fmt(row['recall'])} · precision {fmt(row['precision'])} · F1 {fmt(row['f1'])}",
               help="Overlaps of two filter sets, not classification metrics: recall = share of the class's global MC filters that this "
                    "image also keeps; precision = share of the image's MC filters that are in the class's global set; F1 combines them.")
    c.plotly_chart(viz.agreement_bar(local, global_set, freq, f"Filters of {pick} vs class {classes[pred]}",
                                     activation=ws.extractions.get("test").features[i]), width="stretch")

setting = f"budget {budget}%" if rule == "Review budget" else f"paper rule, threshold {threshold:g}"
export = bui.flagged_export(images.drop(columns=["flagged_now"]), flagged, checked, setting, classes)
st.download_button("Download per-image table (CSV)", export.to_csv(index=False), "flagged_predictions.csv", "text/csv")
