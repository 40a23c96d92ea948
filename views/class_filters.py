"""Class filters: the global MC filters of every class, the images that drive them, and a causal check."""

import numpy as np
import pandas as pd
import streamlit as st

from cfdebug import ui, viz

st.header("Class filters")
ws = ui.workspace_page()
classes = ui.class_names(ws)
st.caption(
    "A class's **global MC filters** are the target-layer filters that its CFE head keeps (the *minimum "
    "correct* set) most often across confidently correct training images. Brighter = kept in more images."
)
filters = ui.global_filters(ws)
hist = filters.histogram.astype(float)
norm = hist / np.maximum(hist.max(1, keepdims=True), 1)

wanted = st.query_params.get("class")
default = classes.index(wanted) if wanted in classes else 0
cls = st.selectbox("Class", range(len(classes)), index=default, format_func=lambda i: classes[i])
if st.query_params.get("class") != classes[cls]:
    st.query_params["class"] = classes[cls]

sort = st.radio("Sort filters by", ["selected class", "all classes", "filter index"], horizontal=True)
if sort == "selected class":
    order = np.lexsort((-hist.sum(0), -norm[cls]))
elif sort == "all classes":
    order = np.argsort(-norm.sum(0), kind="stable")
else:
    order = np.arange(hist.shape[1])
st.plotly_chart(viz.filter_heatmap(norm, classes, order), width="stretch")
table = pd.DataFrame(filters.histogram, index=classes, columns=[f"f{i}" for i in range(hist.shape[1])])
table.insert(0, "voting images", filters.counts)
st.download_button("Download histogram (CSV)", table.to_csv(index_label="class"), "global_mc_filters.csv", "text/csv")

st.subheader(f"Top filters of class {classes[cls]}")
if filters.counts[cls] == 0:
    st.warning(
        f"Class {classes[cls]} has no confidently correct training image (p ≥ {filters.meta['config']['tau']:g}), so its global MC set is empty "
        "and its predictions are reported as unscorable."
    )
    st.stop()
n_top = st.slider("Filters to show", 1, 8, 4)
top = filters.top_filters(cls, n_top)
st.plotly_chart(viz.top_filters_bar(top, hist[cls, top] / filters.counts[cls], f"MC frequency of class {classes[cls]}'s top filters"), width="stretch")
st.caption("For each filter, the training images of this class where it fires most; the overlay shows where (its activation map).")
for f in top:
    indices, overlays = ui.top_activating(ws, cls, int(f), n=6)
    cols = st.columns([1, 6])
    cols[0].markdown(f"**filter f{f}**  \n{int(hist[cls, f])} of {filters.counts[cls]} images")
    grid = cols[1].columns(6)
    for j, image in enumerate(overlays):
        grid[j].image(image, caption=str(ws.data.splits["train"].ids[indices[j]]).split("/")[-1], width="stretch")

st.subheader("Causal check")
st.caption(
    "Zero this class's top global MC filters (every position of their feature maps) and measure its test recall, against zeroing "
    "as many random filters (mean over draws). If the filters matter, the first drop is much larger."
)
c1, c2 = st.columns(2)
top_n = c1.number_input("Filters to zero", 1, int(hist.shape[1]), 5)
draws = c2.number_input("Random draws", 1, 200, 20)
key = f"causal-{cls}-{top_n}-{draws}"
if st.button("Run causal check", type="primary"):
    with st.spinner("Zeroing filters and re-scoring the test split…"):
        st.session_state[key] = ui.causal_check(ws, cls, int(top_n), int(draws))
if key in st.session_state:
    result = st.session_state[key]["per_class"][0]
    m = st.columns(3)
    m[0].metric("Test recall before", f"{result['recall_before']:.3f}")
    m[1].metric(f"Drop, top-{top_n} MC filters zeroed", f"{result['mc_recall_drop']:.3f}")
    m[2].metric(f"Drop, {top_n} random filters", f"{result['random_recall_drop']:.3f}", help=f"mean of {draws} draws, std {result['random_recall_drop_std']:.3f}")
