"""Calibration & robustness: XCR (paper B) against vanilla retraining, clean and corrupted."""

import pandas as pd
import streamlit as st

from cfdebug import ui, viz
from cfdebug.ui import verdicts as verdict_ui
from cfdebug.ui.choices import XCR_BETA_CHOICES
from cfdebug.ui import xcr as xcr_ui
from cfdebug.ui.access import read_only, read_only_notice
from cfdebug.ui.filters import gradcam_layer_note

st.header("Calibration & robustness")
ws = ui.workspace_page()
st.caption(
    "**XCR** trains a selector that keeps the *k* patches of an image which suffice to predict its true label, then "
    "retrains the black box on every batch plus its masked copies T(x) (true labels, 1:1). **Vanilla** is the identical "
    "retraining without T(x): same schedule, same seeds, same data order. **+TS** adds a temperature fitted on the "
    "validation split. Both are scored on the clean test split and on its 15 common corruptions (CIFAR-10-C parameters)."
)

defaults = xcr_ui.default_config(ws)
if not read_only_notice():
    with st.container(border=True):
        st.markdown("**New run** (runs in the background; you can leave the page)")
        a, b, c, d = st.columns(4)
        k = a.number_input("k (patches kept)", min_value=1, value=int(defaults.selector.k), step=1,
                           help=f"Out of d = (image size / {defaults.selector.patch_size})² patches; 12.5% of 256 is 32.")
        betas = list(XCR_BETA_CHOICES)
        beta = b.selectbox("β (KL weight)", betas, index=betas.index(defaults.selector.beta) if defaults.selector.beta in betas else len(betas) - 1)
        selector_epochs = c.number_input("Selector epochs", min_value=1, value=int(defaults.selector.epochs), step=1)
        epochs = d.number_input("Retraining epochs", min_value=1, value=int(defaults.retrain.epochs), step=1)
        a, b, c, d = st.columns(4)
        seeds = a.number_input("Seeds", min_value=1, max_value=10, value=len(defaults.seeds), step=1, help="Tables show the mean over seeds.")
        all_severities = b.checkbox("All 5 severities", value=tuple(defaults.severities) == (1, 2, 3, 4, 5),
                                    help=f"Default: severities {', '.join(map(str, defaults.severities))} of all {len(defaults.corruptions)} corruptions.")
        random_baseline = c.checkbox("Also retrain with random k-hot masks", value=defaults.random_baseline)
        sweep = d.checkbox("Table 1 sweep (paper B)", value=False,
                           help="Table 1 over k ∈ {16, 32, 64} × β ∈ {0.1, 0.01, 0.001}: an XCR and a VIBI selector for each pair. "
                                "Without it, Table 1 is computed at the k and β above, whose selector the run trains anyway.")
        form = dict(k=k, beta=beta, selector_epochs=selector_epochs, epochs=epochs, seeds=seeds, all_severities=all_severities,
                    random_baseline=random_baseline)
        config = xcr_ui.build_config(ws, **form, table1_sweep=sweep)
        expected = xcr_ui.estimate(ws, config)
        with_sweep = expected if sweep else xcr_ui.estimate(ws, xcr_ui.build_config(ws, **form, table1_sweep=True))
        st.markdown(
            f"This run: one selector at **k = {config.k}, β = {config.selector.beta:g}**, vanilla and XCR retraining over "
            f"{len(config.seeds)} seed{'s' if len(config.seeds) != 1 else ''}, {len(config.corruptions) * len(config.severities)} corrupted "
            f"test sets. **Estimated time: {expected.describe()}** on this machine, from a few training steps timed just now."
            + ("" if sweep or with_sweep.cached else f" With the Table 1 sweep: {with_sweep.describe()}.")
        )
        with st.expander("What the estimate is made of"):
            st.dataframe(pd.DataFrame([{"part": part, "seconds": round(sec, 1)} for part, sec in expected.parts.items()]),
                         hide_index=True, width="stretch")
            st.caption("Each part is a measured step time × the steps the settings ask for; selectors already trained for this "
                       "workspace cost nothing. The range allows for the load of a shared machine.")
        if st.button("Train selector and run the report", type="primary"):
            st.query_params["run"] = xcr_ui.start_xcr_run(ws, config, expected)

runs = ui.runs.watch_runs(ws, xcr_ui.RUN_KIND, "XCR report", extras=xcr_ui.pace_line)
done = [r for r in runs if r.status == "done" and r.result]
if not done:
    if any(r.active for r in runs):
        st.info("The XCR run above is in progress; its tables and figures appear here when it finishes.")
    elif read_only():
        st.info("No finished XCR run for this workspace yet, and this read-only dashboard cannot start one.")
    else:
        st.info("No finished XCR run for this workspace yet. Start one above (the estimate says how long it takes here), "
                "or run `python -m cfdebug xcr` in a terminal.")
    st.stop()

ids = [r.run_id for r in done]
wanted = st.query_params.get("run")
run_id = st.selectbox("Finished run", ids, index=ids.index(wanted) if wanted in ids else 0)
if st.query_params.get("run") != run_id:
    st.query_params["run"] = run_id
result = next(r for r in done if r.run_id == run_id).result
st.caption(result.get("settings", ""))

xcr_vs_vanilla = xcr_ui.xcr_verdict_rows(ws, result)
if xcr_vs_vanilla is None:
    st.info("This run was made before XCR reports kept each test image's scores, which the verdict pairs over; launch it again "
            "(or `python -m cfdebug xcr`) to judge XCR against vanilla retraining.")
else:
    headline = next((i for i, r in enumerate(xcr_vs_vanilla) if r.metric == "corrupt_acc"), 0)
    verdict_ui.show(xcr_vs_vanilla, claim="xcr", headline=headline, title="Did XCR retraining beat vanilla retraining?", key=f"{run_id}_verdicts")

# ---- Table 2
st.subheader("Calibration and robustness (Table 2)")
table2 = pd.DataFrame(result["table2"])
columns = ["method", "clean_acc", "corrupt_acc", "clean_ece", "corrupt_ece", "clean_nll", "corrupt_nll", "clean_brier", "corrupt_brier"]
extra = [c for c in ("temperature", "n_seeds") if c in table2]
st.dataframe(table2[columns + extra], hide_index=True, width="stretch",
             column_config={c: st.column_config.NumberColumn(format="%.3f") for c in columns[1:] + ["temperature"]})
st.caption("Accuracy, ECE (15 bins) and NLL as in paper B; Brier is Σ_k (p_k − y_k)² averaged over images, in [0, 2] "
           "(lower is better). *Corrupt* is the mean over every corruption × severity evaluated; numbers are means over seeds.")
st.download_button("Download Table 2 (CSV)", table2.to_csv(index=False), "xcr_table2.csv", "text/csv")

# ---- reliability
st.subheader("Reliability diagrams")
st.caption("Each point is a confidence bin: its accuracy against its mean confidence (below the diagonal: over-confident). The bars "
           "underneath count the images per bin (log scale); a bin with only a few images is a hollow marker off the line.")
with_ts = st.toggle("Include temperature-scaled models (+TS)", value=False)
methods = [m for m in result["reliability"]["clean"] if with_ts or not m.endswith("+TS")]
left, right = st.columns(2)
left.plotly_chart(viz.reliability_diagram({m: result["reliability"]["clean"][m] for m in methods}, "Clean test images"), width="stretch")
if result["reliability"].get("corrupt"):
    right.plotly_chart(viz.reliability_diagram({m: result["reliability"]["corrupt"][m] for m in methods if m in result["reliability"]["corrupt"]},
                                               "Corrupted test images (all corruptions pooled)"), width="stretch")

# ---- severity
per_corruption = result["per_corruption"]
if per_corruption:
    st.subheader("Accuracy and ECE against severity")
    corruptions = list(dict.fromkeys(r["corruption"] for r in per_corruption))
    choice = st.selectbox("Corruption", ["mean"] + corruptions, format_func=lambda c: "mean over corruptions" if c == "mean" else c.replace("_", " "))
    rows = [r for r in per_corruption if with_ts or not r["method"].endswith("+TS")]
    clean = {r["method"]: r for r in result["table2"]}
    left, right = st.columns(2)
    left.plotly_chart(viz.severity_lines(rows, choice, "accuracy", clean={m: r["clean_acc"] for m, r in clean.items()}), width="stretch")
    right.plotly_chart(viz.severity_lines(rows, choice, "ece", clean={m: r["clean_ece"] for m, r in clean.items()}), width="stretch")
    with st.expander("Per corruption and severity"):
        table = pd.DataFrame(per_corruption)
        st.dataframe(table, hide_index=True, width="stretch")
        st.download_button("Download per-corruption table (CSV)", table.to_csv(index=False), "xcr_per_corruption.csv", "text/csv")

# ---- Table 1
with st.expander("Explanation metrics (Table 1)", expanded=False):
    table1 = pd.DataFrame(result["table1"])
    if table1.empty:
        st.info("This run computed no Table 1.")
    else:
        st.dataframe(table1, hide_index=True, width="stretch")
        st.caption("Accuracy: the approximator on T(x) (for random masks: the black box on T(x)). Avg Drop, Avg Inc, fidelity "
                   "and sufficiency: the black box on T(x) with the hard top-k mask, as fractions. When the black box is right on "
                   "every training image, VIBI (imitate the black box) and XCR (fit the labels) train on the same targets.")
        st.download_button("Download Table 1 (CSV)", table1.to_csv(index=False), "xcr_table1.csv", "text/csv")

# ---- gallery
st.subheader("Explanations: image · mask · T(x) · Grad-CAM")
corner = xcr_ui.corner_patches_kept(ws, result["selector"]["config"])
if corner:
    st.markdown(f"**Does the selector keep the corner square?** Its top-{result['selector']['config']['k']} masks keep the square's patches "
                f"in **{corner['kept']:.0%}** of cases on test images ({corner['kept_errors']:.0%} on the black box's errors, "
                f"{corner['kept_correct']:.0%} on correct predictions), against {corner['chance']:.0%} for a random mask of the same size.")
a, b = st.columns([1, 2])
n_show = a.slider("Images", 4, 24, 8, 4)
flagged_first = b.toggle("Flagged predictions first (runs the paper-A detector; cached after the first time)", value=False)
gallery = xcr_ui.mask_gallery(ws, result["selector"]["config"], n_show, flagged_first)
gradcam_layer_note(ws)
for start in range(0, len(gallery), 2):
    cols = st.columns(8)
    for j, row in enumerate(gallery[start : start + 2]):
        images = [row["image"], row["mask"], row["tx"], row["gradcam"]]
        captions = [row["caption"], f"top-{result['selector']['config']['k']} mask", "T(x)", "Grad-CAM"]
        for col, image, caption in zip(cols[4 * j : 4 * j + 4], images, captions):
            col.image(image, caption=caption, width="stretch")
