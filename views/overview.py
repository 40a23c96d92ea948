"""Overview: accuracy, per-class recall, confusion matrix and sample test predictions."""

import numpy as np
import pandas as pd
import streamlit as st

from cfdebug import metrics, ui, viz
from cfdebug.ui import verdicts as verdict_ui

st.header("Overview")
ws = ui.workspace_page()
classes = ui.class_names(ws)
K = len(classes)
st.caption(f"Model **{ws.config.model.name}** (filters at `{ws.target.name}`, {ws.target.channels} channels) on **{ws.data.describe()}**, device `{ws.device}`.")
if ws.data.skipped:
    st.warning(f"{len(ws.data.skipped)} non-image file(s) in the dataset were skipped, e.g. `{ws.data.skipped[0]}`.")

if ws.config.data.source == "biased-digits":
    st.info(
        "**The demo: Biased Digits.** Handwritten digits (scikit-learn's bundled set) where, in training, a small square in "
        "the top-left corner has the digit's own colour on 90% of images; at test time its colour is random. The demo CNN "
        "learns the colour as a shortcut, so it fails on test images whose square points to another class. "
        "Grad-CAM (Flagged predictions) and the XCR masks (Calibration & robustness) light up that corner square. "
        "Next: **Class filters** shows which filters each class relies on; **Flagged predictions** lists the suspect test "
        "predictions; **Treatment** retrains against a plain fine-tuning control. **Hard Digits** (sidebar) is a bed "
        "without a shortcut, where models err for ordinary reasons."
    )
elif ws.config.data.source == "hard-digits":
    st.info(
        "**Hard Digits**: jittered, noisy handwritten digits with no shortcut: nothing but the digit is tied to the class, "
        "so the model's errors are ordinary ones. Compare each method with its baseline here and on the biased demo."
    )
verdicts = verdict_ui.remembered()
with st.container(border=True):
    st.markdown("**Verdicts for this workspace** (each method against its baseline, 95% interval)")
    if not verdicts:
        st.caption("None computed yet in this session: open **Flagged predictions** (detection vs MSP), a finished **Treatment** "
                   "run (treated vs control) or **Calibration & robustness** (XCR vs vanilla); `python -m cfdebug report` "
                   "computes all three over 3 seeds.")
    for claim, rows in verdicts.items():
        if rows:
            st.markdown(f"*{claim}*: " + verdict_ui.sentence(rows[0]))

splits = {name: ui.extraction(ws, name) for name in ("train", "val", "test")}
test = splits["test"]

cols = st.columns(4)
for col, name in zip(cols, ("train", "val", "test")):
    col.metric(f"{name.capitalize()} accuracy", f"{100 * splits[name].accuracy:.1f}%", help=f"{len(splits[name].labels)} images")
cols[3].metric("Test errors", int((test.preds != test.labels).sum()))

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
