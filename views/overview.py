"""Overview: accuracy, per-class recall, confusion matrix and sample test predictions."""

import numpy as np
import pandas as pd
import streamlit as st

from cfdebug import metrics, ui, viz
from cfdebug.config import DEMO_DATASETS
from cfdebug.ui import browser as bui
from cfdebug.ui import verdicts as verdict_ui

st.header("Overview")
ws = ui.workspace_page()
classes = ui.class_names(ws)
K = len(classes)
st.caption(f"Model **{ws.config.model.name}** (filters at `{ws.target.name}`, {ws.target.channels} channels) on **{ws.data.describe()}**, device `{ws.device}`.")
if ws.data.skipped:
    st.warning(f"{len(ws.data.skipped)} file(s) in the dataset could not be used and were skipped (non-image files, broken links, names that are not UTF-8), e.g. `{ws.data.skipped[0]}`.")

if ws.config.data.source == "biased-digits":
    st.info(
        "**The demo: Biased Digits, a planted shortcut.** Handwritten digits (scikit-learn's bundled set, 32 px) with a small "
        "square in the top-left corner. In training, the square has the digit's own colour on 90% of images, so the colour "
        "alone predicts the class; at test time its colour is random. The demo CNN learns the colour as well as the digit, "
        "so on a test image whose square has another class's colour it is pulled toward that class: most of its test errors "
        "are of that kind. cfdebug's job is to show you this without being told."
    )
    share = bui.corner_share(ws)
    if share:
        on_errors = share["mean_errors"] / share["area"]
        st.markdown(
            f"**Where the model looks** (measured, not assumed). The corner square is **{share['area']:.1%}** of the image. Grad-CAM "
            f"toward the predicted class puts **{share['mean_errors']:.1%}** of its mass there on the test errors "
            f"(**{on_errors:.1f}×** the square's area share) and {share['mean_correct']:.1%} on correct predictions "
            f"({share['mean']:.1%} over all {share['n']} test images). "
            + ("So where the model fails, the corner square pulls its attention far beyond its size: the shortcut shows in the explanations."
               if on_errors > 2 else "The corner square draws no more attention than its size on the errors: no sign of the shortcut in Grad-CAM.")
        )
demo = ws.config.data.source == "biased-digits"
with st.expander("What to look at next", expanded=True):
    st.markdown(
        "1. **Class filters**: the filters each class relies on (ranked by how specific they are to it) and where they fire"
        + (" (on the demo: the corner square)" if demo else "") + "; tick the ones that are not evidence.\n"
        "2. **Flagged predictions**: test predictions whose filters disagree with their class's (paper A), against ranking by "
        "confidence (MSP), with a verdict.\n"
        "3. **Sample browser**: every prediction, filtered and sorted; open one to see its Grad-CAM, filters and how the "
        "control and treated models predict it.\n"
        "4. **Treatment**: fine-tune with the MC-filter losses; compare with a plain fine-tuning control (same seeds).\n"
        "5. **Revise**: say what is not evidence (a region, the filters you ticked, an appearance) and fine-tune the model "
        "against it; a verdict against the same fine-tuning without it.\n"
        "6. **Calibration & robustness**: XCR retraining (paper B) against vanilla retraining, clean and corrupted.\n\n"
        + ("**Hard Digits** (sidebar, Dataset) is a bed without a shortcut, where models err for ordinary reasons." if demo else
           "**Biased Digits** (sidebar, Dataset) is the demo with a planted shortcut." if ws.config.data.source in DEMO_DATASETS else
           "**Your own data**: start with **Flagged predictions** (which errors the filters catch) and **Class filters** (what each "
           "class relies on and where it fires); when something the model uses is not evidence, **Revise** it. "
           f"`python -m cfdebug report --data {ws.config.data.source}` judges every method over 3 seeds from a terminal.")
    )
verdicts = verdict_ui.remembered()
with st.container(border=True):
    st.markdown("**Verdicts for this workspace** (each method against its baseline, 95% interval; kept in the workdir)")
    if not verdicts:
        st.caption("None computed yet: open **Flagged predictions** (detection vs MSP over CFE seeds 0, 1, 2, as `python -m cfdebug "
                   "report`), a finished **Treatment** run (treated vs control), **Revise** or **Calibration & robustness** (XCR vs "
                   "vanilla); `python -m cfdebug report` computes them all over 3 seeds.")
    for claim, rows in verdicts.items():
        if rows:
            st.markdown(f"*{claim}*: " + verdict_ui.sentence(rows[0]))

splits = {name: ui.extraction(ws, name) for name in ("train", "val", "test")}
test = splits["test"]

cols = st.columns(4)
for col, name in zip(cols, ("train", "val", "test")):
    col.metric(f"{name.capitalize()} accuracy", f"{100 * splits[name].accuracy:.1f}%", help=f"{len(splits[name].labels)} images")
cols[3].metric("Test errors", int((test.preds != test.labels).sum()))

history = ui.workspace.training_history(ws)
if history:
    with st.expander("How this model was trained: loss and accuracy per epoch"):
        st.plotly_chart(viz.training_curves(history, "Training curves (the best epoch on validation was kept)"), width="stretch")

recall = {name: metrics.per_class_recall(splits[name].preds, splits[name].labels, K) for name in ("train", "test")}
left, right = st.columns(2)
left.plotly_chart(viz.per_class_recall_bar(classes, recall), width="stretch")
cm = metrics.confusion_matrix(test.preds, test.labels, K)
right.plotly_chart(viz.confusion_heatmap(cm, classes), width="stretch")

table = pd.DataFrame(
    {
        "class": classes,
        "test images": cm.sum(1),
        "train recall": recall["train"],
        "test recall": recall["test"],
        "test precision": np.diag(cm) / np.maximum(cm.sum(0), 1),
    }
)
with st.expander("Per-class table", expanded=False):
    st.dataframe(table, hide_index=True, width="stretch")
    st.download_button("Download CSV", table.to_csv(index=False), "per_class.csv", "text/csv")

st.subheader("Sample test predictions")
st.caption("24 random test predictions (✓ correct, ✗ error; the number is the confidence). The **Sample browser** shows all of them, with filters.")
only_errors = st.toggle("Errors only", value=False)
pool = np.flatnonzero(test.preds != test.labels) if only_errors else np.arange(len(test.labels))
rng = np.random.default_rng(0)
shown = np.sort(rng.choice(pool, size=min(24, len(pool)), replace=False)) if len(pool) else pool
if len(shown) == 0:
    st.info("No test errors to show.")
else:
    images = ui.sample_images(ws, "test", shown)
    captions = [
        f"{'✓' if test.preds[i] == test.labels[i] else '✗'} true {classes[test.labels[i]]} · pred {classes[test.preds[i]]} ({test.probs[i].max():.2f})"
        for i in shown
    ]
    grid = st.columns(8)
    for j, (image, caption) in enumerate(zip(images, captions)):
        grid[j % 8].image(image, caption=caption, width="stretch")
