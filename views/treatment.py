"""Treatment: retrain with the MC-filter losses (λ1, λ2) in the background and compare with the CE-only control."""

import numpy as np
import pandas as pd
import streamlit as st

from cfdebug.claims import pair_runs
from cfdebug.ui import verdicts as verdict_ui
from cfdebug import ui, viz
from cfdebug.config import TreatmentConfig
from cfdebug.ui.choices import TREATMENT_LAMBDA1_GRID, TREATMENT_LAMBDA2_GRID, TREATMENT_LR_GRID
from cfdebug.ui import browser as bui
from cfdebug.ui import treatment as tui
from cfdebug.ui.access import read_only, read_only_notice

st.header("Treatment")
ws = ui.workspace_page()
classes = ui.class_names(ws)
st.caption(
    "Fine-tune the target block and head with **L = CE − λ1·Σ|f⊙G_y| + λ2·Σ|(1−G_y)⊙f|**: λ1 rewards the true "
    "class's global MC filters, λ2 penalises the others. Every run also trains the **control** (λ1 = λ2 = 0, same "
    "seed and schedule), so you see what the losses add beyond fine-tuning. The epoch kept is the best on validation."
)
st.caption("On the demo models this treatment changes no test prediction at the paper's λ (the README's verdicts). To remove "
           "a shortcut you have seen, say what is not evidence on the **Revise** page.")

DEFAULTS = TreatmentConfig()
terms = tui.base_batch_terms(ws)


def _share_caption(column, name: str, share: float | None) -> None:
    if share is None:
        column.caption(f"{name}: its share of the loss shows once the CFE heads are fitted (open **Class filters**).")
        return
    small = share < tui.MIN_SHARE
    column.caption(f"{name} would be **{tui.percent(share)}** of the loss on a batch of the base model"
                   + (" — too small to change the model." if small else "."))


if not read_only_notice():
    with st.container(border=True):
        st.markdown("**New run** (treated and control, in the background)")
        c1, c2 = st.columns(2)
        lambda1 = c1.select_slider("λ1 (reward the class's MC filters)", options=list(TREATMENT_LAMBDA1_GRID),
                                   value=min(TREATMENT_LAMBDA1_GRID, key=lambda v: abs(v - DEFAULTS.lambda1)), format_func=lambda v: f"{v:g}",
                                   help="Log-spaced, from where the term is a fraction of a percent of the loss to where it dominates it "
                                        "(measured on the demo and Hard Digits); the paper's grid is 1e-4 … 2e-3.")
        lambda2 = c2.select_slider("λ2 (penalise the other filters)", options=list(TREATMENT_LAMBDA2_GRID),
                                   value=min(TREATMENT_LAMBDA2_GRID, key=lambda v: abs(v - DEFAULTS.lambda2)), format_func=lambda v: f"{v:g}",
                                   help="Log-spaced like λ1; the paper's grid is 1e-5 … 1e-4.")
        shares = tui.share_at(terms, lambda1, lambda2) if terms else {"mc": None, "non_mc": None}
        _share_caption(c1, "λ1·L_MC", shares["mc"])
        _share_caption(c2, "λ2·L_nonMC", shares["non_mc"])
        c3, c4, c5, c6 = st.columns(4)
        epochs = c3.number_input("Epochs", 1, 200, DEFAULTS.epochs)
        lr = c4.select_slider("Learning rate (SGD)", options=list(TREATMENT_LR_GRID), value=DEFAULTS.lr, format_func=lambda v: f"{v:g}")
        seed = c5.number_input("First seed", 0, 10_000, DEFAULTS.seed)
        n_seeds = c6.number_input("Seeds", 1, 5, 3, help="Treated and control runs per seed; 3 or more give the verdict a 95% interval.")
        if st.button("Launch run", type="primary"):
            run_id = tui.launch_treatment(ws, float(lambda1), float(lambda2), int(epochs), float(lr), int(seed), int(n_seeds))
            st.session_state["treatment_selected"] = run_id
            st.toast(f"Started {run_id}")


st.subheader("Runs")
records = ui.runs.watch_runs(ws, "treat", "Treatment sweep", extras=tui.live_curves)
if not records:
    ui.runs.no_runs_note("treatment", "python -m cfdebug treat")
else:
    ui.runs.runs_table([tui.run_row(r, ui.runs.progress(ws, r)) for r in records if r.config])

done = [r for r in records if r.status == "done" and r.result]
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
            **tui.delta(row['fine-tuned']['test_acc_mean'] - row['base']['test_acc_mean'], "vs base"))
m[2].metric(f"Treated (best on val: λ1={best['lambda1']:g}, λ2={best['lambda2']:g})", f"{100 * row['treatment']['test_acc_mean']:.2f}%",
            **tui.delta(row['treatment']['test_acc_mean'] - row['fine-tuned']['test_acc_mean'], "vs control"))
treated_vs_control = tui.treatment_verdict_rows(ws, res)
if treated_vs_control is None:
    st.info("This run was made before treatment runs kept each test image's prediction, which the verdict pairs over; launch it "
            "again to judge the treatment against its control.")
else:
    verdict_ui.show(treated_vs_control, claim="treatment", title="Did the treatment beat its CE control?", key=f"{run_id}_verdicts")
if len(res["control"]) < 2:
    st.caption("One seed: the interval is over test images only; launch the same λ pair with more seeds, or run "
               "`python -m cfdebug treat --seeds 0,1,2`, to pair over seeds too.")
st.dataframe(t2.astype(object).where(t2.notna(), "—"), hide_index=True, width="stretch")  # the base model has no λ: a dash, not "None"
st.download_button("Download Table 2 (CSV)", t2.to_csv(index=False), f"{run_id}_table2.csv", "text/csv")

st.caption("**Table 2** (means over seeds; std with ddof = 1). *fine-tuned* is the control. The verdict above compares treated "
           "with control; below, every comparison puts **treated − control** first (what λ1/λ2 add) and **control − base** "
           "beside it (what fine-tuning alone did), so fine-tuning is not credited to the losses.")

base_recall = np.asarray(res["base"]["per_class_recall"], float)
control_recall = np.mean([r["per_class_recall"] for r in res["control"]], axis=0)
treated_recall = np.mean([r["per_class_recall"] for r in pair_runs(res)], axis=0)
recall = tui.recall_table(classes, base_recall, control_recall, treated_recall)
st.plotly_chart(
    viz.per_class_recall_bar(list(recall["class"]), {"base": recall["base"], "control": recall["control"], "treated": recall["treated"]},
                             "Per-class test recall, sorted by the treatment's effect (treated − control), means over seeds"),
    width="stretch",
)
with st.expander("Per-class recall: treated − control and control − base", expanded=True):
    st.dataframe(recall, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%+.3f" if "−" in c else "%.3f") for c in recall.columns if c != "class"})
    st.download_button("Download per-class recall (CSV)", recall.to_csv(index=False), f"{run_id}_per_class.csv", "text/csv")
    st.caption("Table 3 of the paper (treated − base, as the run stored it) is in the run's result JSON; it mixes the fine-tuning's "
               "effect into the treatment's, so it is not shown here.")

changes = tui.best_model_changes(record)
if changes is not None:
    which = f"λ1={changes['lambda1']:g}, λ2={changes['lambda2']:g}, seed {changes['seed']}"
    compare = tui.prediction_comparison(changes, len(classes))
    if compare is None:
        st.warning(f"Run {run_id} was made before runs kept the control's per-image predictions, so the per-image comparison below is "
                   "against the **base** model, not the control. Launch the run again to compare with the control.")
        left, right = st.columns(2)
        left.plotly_chart(viz.confusion_delta_heatmap(np.asarray(changes["confusion_delta"]), classes, "Confusion change, treated − base (test)"), width="stretch")
        pairs = [("treated vs base", {"fixed": np.asarray(changes["fixed"], int), "broken": np.asarray(changes["broken"], int)},
                  np.asarray(changes["base_test_predictions"]), np.asarray(changes["test_predictions"]))]
        labels = np.asarray(changes["labels"])
    else:
        left, right = st.columns(2)
        left.plotly_chart(viz.confusion_delta_heatmap(compare["treated_vs_control"]["confusion_delta"], classes,
                                                      f"Treated − control ({which})"), width="stretch")
        right.plotly_chart(viz.confusion_delta_heatmap(compare["control_vs_base"]["confusion_delta"], classes,
                                                       f"Control − base (fine-tuning alone, seed {changes['seed']})"), width="stretch")
        st.caption("Green: more correct predictions on the diagonal or fewer errors off it; red: the opposite. Numbers are image counts; "
                   "an empty matrix means no change. Image captions: true class: before→after.")
        pairs = [("treated vs control", compare["treated_vs_control"], compare["control"], compare["treated"]),
                 ("control vs base", compare["control_vs_base"], compare["base"], compare["control"])]
        labels = compare["labels"]
    for name, d, before, after in pairs:
        st.markdown(f"**{name.capitalize()}** ({which}): {len(d['fixed'])} test errors fixed, {len(d['broken'])} new errors "
                    f"(net {len(d['fixed']) - len(d['broken']):+d}).")
        if not len(d["fixed"]) and not len(d["broken"]):
            st.caption("Both models predict every test image alike.")
        for label, idx in (("fixed", d["fixed"]), ("broke", d["broken"])):
            if len(idx):
                shown = idx[:10]
                cols = st.columns(10)
                for j, (i, image) in enumerate(zip(shown, ui.sample_images(ws, "test", shown))):
                    cols[j].image(image, caption=f"{label} {classes[labels[i]]}: {classes[before[i]]}→{classes[after[i]]}", width="stretch")
    rule = bui.chosen_flag_rule()
    fc = tui.flagged_set_change(ws, record, rule)
    if fc:
        st.markdown(
            f"**Flagged set, treated vs base** ({bui.describe_flag_rule(rule)}, the rule chosen on **Flagged predictions**; detection "
            f"recomputed on the treated model, the control has none): {fc['flagged_errors_fixed']} of {fc['flagged_errors_before']} flagged "
            f"errors fixed; of the {fc['new_errors']} new errors, {fc['new_errors_flagged']} are flagged by the treated model's detection; "
            f"flagged predictions {fc['flagged_before']} → {fc['flagged_after']}."
        )
    st.markdown("Open any of these images in the **Sample browser** to see how base, control and treated predict it.")

st.subheader("Loss terms of this run")
history = tui.history_rows(res)
tui.show_shares(history, key=f"{run_id}-shares")
with st.expander("Per-epoch curves of this run", expanded=bool(tui.share_warnings(history))):
    st.plotly_chart(viz.training_curves(history, "Loss terms and validation accuracy per epoch"), width="stretch")
weights = tui.treated_weights(record)
if weights is not None and not read_only():
    if st.button("Use the treated model as the workspace model", help="The other pages then recompute on the treated weights"):
        ui.use_weights(ws.config, weights)

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
