"""Revise: say what is not evidence, fine-tune against it in the background, judge the fix against a CE control."""

import numpy as np
import pandas as pd
import streamlit as st

from cfdebug import ui, viz
from cfdebug.claims import revise_verdicts
from cfdebug.config import ReviseConfig
from cfdebug.ui import revise as rui
from cfdebug.ui import verdicts as verdict_ui
from cfdebug.ui.access import read_only, read_only_notice

st.header("Revise")
ws = ui.workspace_page()
classes = ui.class_names(ws)
size = ws.data.input_size
st.caption(
    "The other pages **reveal** why the model fails (Grad-CAM on the flagged errors, the class filters). Here you say what "
    "is **not evidence**: a region of the image, some filters, or an appearance. cfdebug then fine-tunes the model against it "
    "and, with the same schedule and seeds, a plain cross-entropy **control**, and judges the fix against the control on the "
    "test split, paired over seeds and test images. Epochs (and a region's fill) are chosen on **counterfactual validation**: "
    "the validation split with what you declared swapped out (a region showing another class's content, the filters zeroed, "
    "the colours jittered). Plain validation still carries the shortcut, and the test split never chooses anything."
)

KINDS = {"region": "A region of the image", "filters": "Some filters", "appearance": "An appearance (colours)"}
kind = st.segmented_control("What is not evidence?", list(KINDS), format_func=KINDS.get,
                            default=st.query_params.get("declare", "region") if st.query_params.get("declare") in KINDS else "region")
kind = kind or "region"
if st.query_params.get("declare") != kind:
    st.query_params["declare"] = kind
DEFAULTS = ReviseConfig()
method, region, filters = None, None, []

if kind == "region":
    detection = rui.cached_detection(ws)
    proposal = rui.proposed_region(ws, detection) if detection is not None else None
    region = rui.url_region(st.query_params.get("region"), size) or proposal
    errors = [i for i, r in enumerate(detection["images"]) if r["error"]] if detection is not None else []  # test-split order
    pick = errors[0] if errors else 0
    left, right = st.columns([3, 2])
    with left:
        image = ui.sample_images(ws, "test", [pick])[0]
        event = st.plotly_chart(viz.region_picker(image, region, proposal, f"Test image {pick}: drag a box over what is not evidence"),
                                on_select="rerun", selection_mode="box", key="region-picker", width="stretch")
        drawn = rui.box_region(getattr(event, "selection", None) if event else None, size)
        if drawn is not None and drawn != region:
            st.query_params["region"] = drawn.text()
            st.rerun()
    with right:
        if detection is None:
            st.caption("A proposed region needs the flags of the test predictions: open **Flagged predictions** once (it "
                       "fits the CFE heads in the background), or draw a box.")
        if proposal is not None:
            st.markdown(f"**Proposed** (dashed): `{proposal.text()}`, where Grad-CAM looks on the test errors more than on the correct "
                        "predictions.")
            if st.button("Use the proposed region", disabled=region == proposal):
                st.query_params["region"] = proposal.text()
                st.rerun()
        # One field, keyed: it shows what the URL holds (a drawn box, the proposal, or what was typed,
        # valid or not). Unkeyed, its identity followed its default (the region, which falls back to
        # the proposal on an invalid entry), each identity kept its own typed value, and the page
        # reran between them for ever.
        shown = st.query_params.get("region") or (proposal.text() if proposal is not None else "")
        if st.session_state.get("region-text-of") != shown:
            st.session_state["region-text"], st.session_state["region-text-of"] = shown, shown
        text = st.text_input("Region X0,Y0,X1,Y1 (input pixels, X1 and Y1 exclusive)", key="region-text",
                             help=f"The model's input is {size}×{size} px; the demo's corner square is 1,1,7,7.")
        if text and text != st.query_params.get("region") and (region is None or text != region.text()):
            st.query_params["region"] = text
            st.rerun()
        choice = st.radio("How", ["region-counterfactual", "region-rrr"], horizontal=False, format_func={
            "region-counterfactual": "Counterfactual: replace the region's pixels in every training batch",
            "region-rrr": "Right for the right reasons: penalise input gradients inside the region"}.get)
        method = choice
        fill = st.selectbox("Fill", ["auto", "colour", "noise", "other-class"], help="auto: chosen on counterfactual validation (first seed)",
                            disabled=method != "region-counterfactual")
elif kind == "filters":
    from_url = [int(f) for f in (st.query_params.get("filters") or "").split(",") if f.strip().isdigit()]
    suggested = rui.suggested_filters(ws, 8)
    filters = st.multiselect(f"Filters of `{ws.target.name}` that are not evidence", list(range(ws.target.channels)),
                             default=from_url or suggested,
                             help="Tick them on the Class filters page, or start from the 8 most class-specific filters (the default).")
    method = st.radio("How", ["filters", "filters-zero"], format_func={
        "filters": "Fine-tune: suppress them (paper A's L_nonMC on them) and drop them from every class's MC set",
        "filters-zero": "Zero them in the classifier head (no training)"}.get)
    fill = "auto"
else:
    method, fill = "appearance", "auto"
    st.markdown("Every training image gets its colours jittered (brightness, contrast, saturation, hue) or turned grey, so a colour "
                "cast or tint cannot be evidence.")

with st.expander("Schedule (the method and its control share it)"):
    c1, c2, c3 = st.columns(3)
    n_seeds = c1.number_input("Seeds", 1, 5, 3, help="3 or more give the verdict an interval over seeds as well as images.")
    epochs = c2.number_input("Epochs", 1, 100, DEFAULTS.epochs)
    lr = c3.select_slider("Learning rate (Adam, every layer)", options=[1e-4, 3e-4, 1e-3, 3e-3], value=DEFAULTS.lr, format_func=lambda v: f"{v:g}")
    c4, c5 = st.columns(2)
    rrr_lambda = c4.select_slider("λ (RRR)", options=[0.1, 0.3, 1.0, 3.0, 10.0], value=DEFAULTS.rrr_lambda, disabled=method != "region-rrr")
    filter_lambda = c5.select_slider("λ (filters)", options=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2], value=DEFAULTS.filter_lambda,
                                     format_func=lambda v: f"{v:g}", disabled=method != "filters")

judged_on = region if kind == "region" else rui.url_region(st.query_params.get("region"), size)
if kind != "region" and judged_on is not None:
    st.caption(f"The run is also re-evaluated on the region {judged_on.text()} set on *A region of the image*: the Grad-CAM "
               "share there and the accuracy when it shows another class's content (the method does not use it).")

if not read_only_notice():
    if st.button(f"Launch {method}" + (f" on region {region.text()}" if region is not None and kind == "region" else ""), type="primary",
                 disabled=(kind == "region" and region is None) or (kind == "filters" and not filters)):
        config = ReviseConfig(epochs=int(epochs), lr=float(lr), fill=fill, rrr_lambda=float(rrr_lambda), filter_lambda=float(filter_lambda))
        run_id = rui.launch_revise(ws, method, judged_on, filters if kind == "filters" else None,
                                   list(range(int(n_seeds))), config)
        st.query_params["run"] = run_id
        st.toast(f"Started {run_id}")

st.subheader("Runs")
records = ui.runs.watch_runs(ws, "revise", "Revise run", extras=rui.live_curves)
if not records:
    ui.runs.no_runs_note("revise", "python -m cfdebug revise")
    st.stop()

def _listed(values) -> str | None:
    return ",".join(map(str, values)) if values else None


ui.runs.runs_table([{
    "run": r.run_id, "status": r.status, "method": (r.config.get("declaration") or {}).get("method"),
    "region": _listed((r.config.get("declaration") or {}).get("region")), "filters": _listed((r.config.get("declaration") or {}).get("filters")),
    "seeds": ui.runs.seeds_label(r.config.get("seeds")),
} for r in records if r.config])

done = [r for r in records if r.status == "done" and r.result]
if not done:
    st.stop()
st.subheader("Did the fix work?")
ids = [r.run_id for r in done]
wanted = st.query_params.get("run")
run_id = st.selectbox("Run", ids, index=ids.index(wanted) if wanted in ids else 0)
record = next(r for r in done if r.run_id == run_id)
res = record.result
rows = revise_verdicts(res, res["labels"], classes, np.isin(np.arange(len(res["labels"])), res["flagged"]))
verdict_ui.show(rows, claim="revise", title=f"{res['declaration']['method']} vs its CE control", key=f"{run_id}_verdicts")
summary = pd.DataFrame(res["summary"])


def _cell(value, column: str) -> str:
    """A summary cell as text: a dash where the base model has no seed, fill or epoch; counts as
    integers; scores to 4 decimals."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if column in ("seed", "best_epoch"):
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, (float, np.floating)) else str(value)


st.dataframe(pd.DataFrame({c: [_cell(v, c) for v in summary[c]] for c in summary.columns}), hide_index=True, width="stretch")
st.download_button("Download the models' summary (CSV)", summary.to_csv(index=False), f"{run_id}_summary.csv", "text/csv")
if res.get("fill_scores"):
    fills = res["fill_scores"]
    scores = ", ".join(f"{f} {v['val_acc']:.3f}" for f, v in fills.items())
    tied = sum(abs(v["val_acc"] - fills[res["fill"]]["val_acc"]) < 1e-9 for v in fills.values()) > 1
    losses = ", ".join(f"{f} {v['val_loss']:.3f}" for f, v in fills.items())
    st.caption(f"Fill chosen on counterfactual validation (first seed): **{res['fill']}**: accuracy {scores}"
               + (f"; tied, so the lowest validation loss decided ({losses})." if tied else "."))
elif res.get("fill"):
    st.caption(f"Fill: **{res['fill']}** (as launched).")
st.caption("cf_val_acc: counterfactual validation (what chose each epoch); cam_over_area: Grad-CAM mass in the region over its area "
           "share (1 = no more than chance); wrong_region_acc: accuracy when the region shows another class's content.")

labels = np.asarray(res["labels"])
method_pred = np.asarray(res["method"][0]["test_predictions"])
control_pred = np.asarray(res["control"][0]["test_predictions"])
base_pred = np.asarray(res["base"]["test_predictions"])
recall = {name: np.array([np.mean(p[labels == k] == k) if np.any(labels == k) else np.nan for k in range(len(classes))])
          for name, p in (("base", base_pred), ("control", control_pred), ("revised", method_pred))}
st.plotly_chart(viz.per_class_recall_bar(classes, recall, "Per-class test recall, first seed: base, CE control, revised"), width="stretch")

fixed = np.flatnonzero((control_pred != labels) & (method_pred == labels))
broken = np.flatnonzero((control_pred == labels) & (method_pred != labels))
st.markdown(f"**Revised vs control** (first seed): {len(fixed)} test errors fixed, {len(broken)} new errors (net {len(fixed) - len(broken):+d}).")
weights = rui.model_weights(record, "method")
if weights is not None:
    shown = list(fixed[:6]) or list(np.flatnonzero(method_pred == labels)[:6])
    revised = rui.revised_workspace(ws, weights)
    if revised is not None and shown:
        st.markdown("**Grad-CAM before and after**, on the same test images (predicted class): base model above, revised below.")
        for model_ws, preds in ((ws, base_pred), (revised, method_pred)):
            cols = st.columns(len(shown))
            for col, i, image in zip(cols, shown, ui.gradcam_overlays(model_ws, "test", shown, [int(preds[i]) for i in shown])):
                col.image(image, caption=f"{classes[labels[i]]}: predicted {classes[preds[i]]}", width="stretch")
    for label, idx in (("broke", broken[:10]),):
        if len(idx):
            st.markdown(f"Images the revision **{label}** (right under the control, wrong now):")
            cols = st.columns(10)
            for j, (i, image) in enumerate(zip(idx, ui.sample_images(ws, "test", idx))):
                cols[j].image(image, caption=f"{classes[labels[i]]}: {classes[control_pred[i]]}→{classes[method_pred[i]]}", width="stretch")
    if not read_only() and st.button("Use the revised model as the workspace model", help="The other pages then recompute on the revised weights"):
        ui.use_weights(ws.config, weights)
