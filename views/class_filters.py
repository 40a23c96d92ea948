"""Class filters: the global MC filters of every class, the images that drive them, and a causal check."""

import numpy as np
import pandas as pd
import streamlit as st

from cfdebug import ui, viz
from cfdebug.mcfilters import RANKINGS, filter_specificity, mc_frequency, rank_filters
from cfdebug.ui import browser as bui

st.header("Class filters")
ws = ui.workspace_page()
classes = ui.class_names(ws)
st.caption(
    "A class's **global MC filters** are the target-layer filters that its CFE head keeps (the *minimum correct* set) "
    "across confidently correct training images. **MC frequency**: the share of the class's voting images in which a "
    "filter is kept. Many filters are kept for every image of every class (generic filters); **specificity** (frequency in "
    "this class minus the mean over the other classes) separates the filters this class relies on from those."
)
filters = ui.global_filters(ws)
hist = filters.histogram.astype(float)
freq = mc_frequency(filters.histogram, filters.counts)
specificity = filter_specificity(filters.histogram, filters.counts)

wanted = st.query_params.get("class")
default = classes.index(wanted) if wanted in classes else 0
a, b = st.columns([1, 2])
cls = a.selectbox("Class", range(len(classes)), index=default, format_func=lambda i: classes[i])
if st.query_params.get("class") != classes[cls]:
    st.query_params["class"] = classes[cls]
rankings = list(RANKINGS)
wanted_rank = st.query_params.get("rank")
by = b.radio("Rank filters by", rankings, horizontal=True, index=rankings.index(wanted_rank) if wanted_rank in rankings else 0,
             help="specificity: MC frequency here minus the mean in the other classes; magnitude: mean activation when kept; "
                  "frequency: share of voting images (the paper's histogram).")
if st.query_params.get("rank", "specificity") != by:
    st.query_params["rank"] = by
order = rank_filters(filters, cls, by)
value = {"specificity": specificity, "magnitude": filters.normalised_magnitude(), "frequency": freq}[by]
shown = value / np.maximum(np.abs(value).max(1, keepdims=True), 1e-12) if by != "frequency" else freq
st.plotly_chart(viz.filter_heatmap(shown, classes, order, title=f"Filters per class by {by}, columns ranked for class {classes[cls]}",
                                   signed=by == "specificity"), width="stretch")
st.caption(f"Columns: every filter, in class {classes[cls]}'s {by} order (the same order as the top filters below). "
           + ("Colour: specificity scaled to each row's maximum; negative = kept more often by other classes." if by == "specificity"
              else "Colour: scaled to each row's maximum."))
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
top = order[:n_top]
others = np.delete(freq, cls, axis=0)[np.delete(filters.counts, cls) > 0]
st.plotly_chart(viz.top_filters_bar(top, freq[cls, top], f"Class {classes[cls]}'s top filters by {by}: MC frequency here vs in other classes",
                                    other=others[:, top].mean(0) if len(others) else None), width="stretch")
st.caption("For each filter, the training images of this class where it fires most; the orange outline (and tint) marks where it "
           "fires at half its peak or more. ✓/✗: the model's prediction on that training image. **Where** it fires is measured on the "
           "activation maps of the class's 32 training images where it fires most: where its strongest response lies, and the share "
           "of its activation there. Tick filters that are not evidence to revise the model against them.")
places = {int(f): bui.filter_location(ws, cls, int(f)) for f in top}
if ws.config.data.source in ("biased-digits", "hard-digits") and places:
    area = next(iter(places.values()))["area"]
    in_square = [f for f, loc in places.items() if loc["where"] == "the corner square" and loc["peaks"] >= 0.5]
    st.markdown(
        f"**Where they fire, measured:** {len(in_square)} of these {len(top)} filters respond most strongly in the corner square (the "
        f"planted shortcut, {area:.1%} of the image) on most of the class's images where they fire"
        + (f" ({', '.join(f'f{f}' for f in in_square)}): that colour is what they detect." if in_square
           else "; the others respond to the digit's strokes (the outlines below). The shortcut shows in where Grad-CAM looks on "
                "the errors (**Overview**) rather than in these filters.")
    )
ticked = []
for f in top:
    f = int(f)
    loc = places[f]
    indices, overlays, captions = bui.top_activating(ws, cls, f, n=6)
    cols = st.columns([1, 6])
    cols[0].markdown(f"**filter f{f}**  \nkept in {freq[cls, f]:.0%} of class {classes[cls]}'s {filters.counts[cls]} voting images, "
                     f"specificity {specificity[cls, f]:+.2f}  \nstrongest in **{loc['where']}** on {loc['peaks']:.0%} of these images; "
                     f"{loc['share']:.1%} of its activation there (the region is {loc['area']:.1%} of the image)")
    if cols[0].checkbox("not evidence", key=f"tick-{cls}-{f}", help="Tick to open the Revise page with this filter declared not evidence."):
        ticked.append(f)
    grid = cols[1].columns(6)
    for j, image in enumerate(overlays):
        grid[j].image(image, caption=captions[j], width="stretch")
if ticked:
    names = ", ".join(f"f{f}" for f in ticked)
    st.page_link("views/revise.py", label=f"Revise the model against {names}", icon=":material/build:",
                 query_params={"filters": ",".join(map(str, ticked)), "declare": "filters"})
else:
    st.caption("Tick **not evidence** under a filter to revise the model against it (the **Revise** page).")

st.subheader("Causal check")
st.caption(
    "Zero this class's most frequent global MC filters (the paper's histogram order; every position of their feature maps) and measure its test recall, against zeroing "
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
