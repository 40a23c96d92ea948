"""Treatment: retrain with the MC-filter losses (λ1, λ2) in the background and compare with the CE-only control."""

import dataclasses

import numpy as np
import pandas as pd
import streamlit as st

from cfdebug.claims import pair_runs, treatment_verdicts
from cfdebug.ui import verdicts as verdict_ui
from cfdebug import ui, viz
from cfdebug.config import TREATMENT_LAMBDA1_GRID, TREATMENT_LAMBDA2_GRID, TREATMENT_LR_GRID, TreatmentConfig
from cfdebug.runs import cancel
from cfdebug.ui import treatment as tui

st.header("Treatment")
ws = ui.workspace_page()
classes = ui.class_names(ws)
st.caption(
    "Fine-tune the target block and head with **L = CE − λ1·Σ|f⊙G_y| + λ2·Σ|(1−G_y)⊙f|**: λ1 rewards the true "
    "class's global MC filters, λ2 penalises the others. Every run also trains the **control** (λ1 = λ2 = 0, same "
    "seed and schedule), so you see what the losses add beyond fine-tuning. The epoch kept is the best on validation."
)

DEFAULTS = TreatmentConfig()
with st.form("launch"):
    c1, c2 = st.columns(2)
    lambda1 = c1.select_slider("λ1 (MC filters)", options=list(TREATMENT_LAMBDA1_GRID), value=DEFAULTS.lambda1, format_func=lambda v: f"{v:g}",
                               help="Log-spaced; the paper's grid spans 1e-4 … 2e-3")
    lambda2 = c2.select_slider("λ2 (non-MC filters)", options=list(TREATMENT_LAMBDA2_GRID), value=DEFAULTS.lambda2, format_func=lambda v: f"{v:g}",
                               help="Log-spaced; the paper's grid spans 1e-5 … 1e-4")
    c3, c4, c5, c6 = st.columns(4)
    epochs = c3.number_input("Epochs", 1, 200, DEFAULTS.epochs)
    lr = c4.select_slider("Learning rate (SGD)", options=list(TREATMENT_LR_GRID), value=DEFAULTS.lr, format_func=lambda v: f"{v:g}")
    seed = c5.number_input("First seed", 0, 10_000, DEFAULTS.seed)
    n_seeds = c6.number_input("Seeds", 1, 5, 3, help="Treated and control runs per seed; 3 or more give the verdict a 95% interval.")
    if st.form_submit_button("Launch run", type="primary"):
        run_id = tui.launch_treatment(ws, float(lambda1), float(lambda2), int(epochs), float(lr), int(seed), int(n_seeds))
        st.session_state["treatment_selected"] = run_id
        st.toast(f"Started {run_id}")


@st.fragment(run_every=2)
def live_runs():
    records = tui.runs_for(ws)
    if not records:
        st.info("No treatment run yet for this model and dataset. Launch one above, or run `python -m cfdebug treat`.")
        return
    rows = []
    for r in records:
        p = r.progress or {}
        spec = r.config.get("treatment", {})
        rows.append({
            "run": r.run_id, "status": r.status, "λ1": spec.get("lambda1"), "λ2": spec.get("lambda2"), "seed": spec.get("seed"),
            "epochs": spec.get("epochs"), "epoch": p.get("epoch"), "run part": p.get("tag"), "loss": p.get("loss"),
            "ce": p.get("ce"), "mc": p.get("mc"), "non_mc": p.get("non_mc"), "val acc": p.get("val_acc"), "error": r.error,
        })
    table = pd.DataFrame(rows)
    st.dataframe(table, hide_index=True, width="stretch")
    running = [r for r in records if r.status in ("queued", "running")]
    for r in running:
        p = r.progress or {}
        total = 2 * len(r.config.get("seeds", [0])) * max(int(r.config.get("treatment", {}).get("epochs", 1)), 1)  # control + treated per seed
        done = len(tui.registry(ws).progress(r.run_id))
        st.progress(min(done / total, 1.0), text=f"{r.run_id}: {p.get('tag') or 'starting'} epoch {p.get('epoch', 0)}")
    if running:
        cols = st.columns([3, 1])
        victim = cols[0].selectbox("Running", [r.run_id for r in running], label_visibility="collapsed")
        if cols[1].button("Cancel run"):
            cancel(tui.registry(ws), victim)
            st.toast(f"Cancel requested for {victim}")
    finished = {r.run_id for r in records if r.status == "done"}
    if finished != st.session_state.get("treatment_finished_seen", finished):
        st.session_state["treatment_finished_seen"] = finished
        st.rerun()  # a run finished: redraw the results below
    st.session_state["treatment_finished_seen"] = finished


st.subheader("Runs")
live_runs()

done = [r for r in tui.runs_for(ws) if r.status == "done" and r.result]
if not done:
    st.stop()

st.subheader("Results")
ids = [r.run_id for r in done]
wanted = st.query_params.get("run") or st.session_state.get("treatment_selected")
run_id = st.selectbox("Run", ids, index=ids.index(wanted) if wanted in ids else 0)
if st.query_params.get("run") != run_id:
    st.query_params["run"] = run_id
record = next(r for r in done if r.run_id == run_id)
res = record.result
t2 = pd.DataFrame(res["table2"])
m = st.columns(3)
best = res["best"]
row = {r["model"]: r for r in res["table2"] if r["model"] != "treatment"}
row["treatment"] = next(r for r in res["table2"] if r["model"] == "treatment" and (r["lambda1"], r["lambda2"]) == (best["lambda1"], best["lambda2"]))
m[0].metric("Base test acc.", f"{100 * row['base']['test_acc_mean']:.2f}%")
m[1].metric("Control (CE fine-tune)", f"{100 * row['fine-tuned']['test_acc_mean']:.2f}%",
            f"{100 * (row['fine-tuned']['test_acc_mean'] - row['base']['test_acc_mean']):+.2f} pts")
m[2].metric(f"Treated (best on val: λ1={best['lambda1']:g}, λ2={best['lambda2']:g})", f"{100 * row['treatment']['test_acc_mean']:.2f}%",
            f"{100 * (row['treatment']['test_acc_mean'] - row['fine-tuned']['test_acc_mean']):+.2f} pts vs control")
treated_vs_control = treatment_verdicts(res, classes)
verdict_ui.remember("treatment", treated_vs_control)
verdict_ui.show(treated_vs_control, title="Did the treatment beat its CE control?", key=f"{run_id}_verdicts")
if len(res["control"]) < 2:
    st.caption("One seed gives no interval: launch the same λ pair with more seeds, or run "
               "`python -m cfdebug treat --seeds 0,1,2`, to judge it.")
st.dataframe(t2, hide_index=True, width="stretch")
st.download_button("Download Table 2 (CSV)", t2.to_csv(index=False), f"{run_id}_table2.csv", "text/csv")

base_recall = np.asarray(res["base"]["per_class_recall"], float)
control_recall = np.mean([r["per_class_recall"] for r in res["control"]], axis=0)
treated_recall = np.mean([r["per_class_recall"] for r in pair_runs(res)], axis=0)
order = np.argsort(-(treated_recall - base_recall), kind="stable")
sorted_classes = [classes[i] for i in order]
st.plotly_chart(
    viz.per_class_recall_bar(sorted_classes, {"base": base_recall[order], "control": control_recall[order], "treated": treated_recall[order]},
                             "Per-class test recall, sorted by change (treated − base)"),
    width="stretch",
)
left, right = st.columns(2)
t3 = res["table3"]
t3_rows = [dict(group=g, **r) for g in ("improved", "worsened") for r in t3[g]]
left.markdown("**Table 3**: classes whose recall changed most")
left.dataframe(pd.DataFrame(t3_rows).drop(columns=["class_index"], errors="ignore"), hide_index=True, width="stretch")

changes = tui.best_model_changes(record)
if changes is not None:
    base_preds, after, labels = (np.asarray(changes[k]) for k in ("base_test_predictions", "test_predictions", "labels"))
    fixed, broken = np.asarray(changes["fixed"], int), np.asarray(changes["broken"], int)
    right.plotly_chart(viz.confusion_delta_heatmap(np.asarray(changes["confusion_delta"]), classes), width="stretch")
    st.markdown(f"**Churn on the test split**: {len(fixed)} errors fixed, {len(broken)} new errors.")
    fc = res.get("flagged_churn")
    if fc:
        st.markdown(
            f"**Flagged set** (detection recomputed on the treated model): {fc['flagged_errors_fixed']} of "
            f"{fc['flagged_errors_before']} flagged errors fixed; of the {fc['new_errors']} new errors, "
            f"{fc['new_errors_flagged']} are flagged by the treated model's detection; flagged predictions "
            f"{fc['flagged_before']} → {fc['flagged_after']}."
        )
    for label, idx in (("fixed", fixed), ("new error", broken)):
        if len(idx):
            shown = idx[:12]
            cols = st.columns(12)
            for j, (i, image) in enumerate(zip(shown, ui.sample_images(ws, "test", shown))):
                was, now = classes[base_preds[i]], classes[after[i]]
                cols[j].image(image, caption=f"{label}: {classes[labels[i]]} (was {was}, now {now})", width="stretch")
weights = tui.treated_weights(record)
if weights is not None:
    if st.button("Use the treated model as the workspace model", help="The other pages then recompute on the treated weights"):
        cfg = ws.config
        st.session_state[ui.workspace.STATE_KEY] = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=str(weights)))
        st.rerun()

if len(done) >= 2:
    st.subheader("Compare two runs")
    pick = st.multiselect("Runs", ids, default=ids[:2], max_selections=2)
    if len(pick) == 2:
        a, b = (next(r for r in done if r.run_id == i).result for i in pick)
        series = {i: np.mean([r["per_class_recall"] for r in pair_runs(x)], axis=0) for i, x in zip(pick, (a, b))}
        st.plotly_chart(viz.per_class_recall_bar(classes, series, "Per-class test recall of the treated models"), width="stretch")
        compare = pd.DataFrame([
            {"run": i, **next(r for r in x["table2"] if r["model"] == "treatment" and (r["lambda1"], r["lambda2"]) == (x["best"]["lambda1"], x["best"]["lambda2"]))}
            for i, x in zip(pick, (a, b))
        ])
        st.dataframe(compare, hide_index=True, width="stretch")
