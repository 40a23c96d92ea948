"""Sample browser: every test and train prediction, filtered and sorted; one opens in detail."""

import numpy as np
import streamlit as st

from cfdebug import ui, viz
from cfdebug.ui import browser as bui
from cfdebug.ui.filters import gradcam_layer_note

st.header("Sample browser")
ws = ui.workspace_page()
classes = ui.class_names(ws)
K = len(classes)
st.caption(
    "Every prediction of the test (or train) split. Filter by true and predicted class, outcome, flag and confidence; sort "
    "by confidence or by **agreement** (how well the image's own MC filters match its predicted class's, minus that class's "
    "mean on training images: below 0 is suspect). **Flagged** follows the rule chosen on the Flagged view: "
    f"{bui.describe_flag_rule(bui.chosen_flag_rule())} (change it there). Click **open** under an image to see it in "
    "detail. The filters and the open image are in the URL, so a link reopens this view."
)

q = st.query_params
sel = bui.Selection.from_query(q, K)
with st.container(border=True):
    a, b, c, d = st.columns([1, 2, 2, 1])
    split = a.selectbox("Split", bui.SPLITS, index=bui.SPLITS.index(sel.split))
    true = b.multiselect("True class", range(K), default=list(sel.true), format_func=lambda i: classes[i], placeholder="any")
    pred = c.multiselect("Predicted class", range(K), default=list(sel.predicted), format_func=lambda i: classes[i], placeholder="any")
    outcome = d.selectbox("Outcome", bui.OUTCOMES, index=bui.OUTCOMES.index(sel.outcome))
    a, b, c = st.columns([1, 2, 1])
    flag = a.selectbox("Flag", bui.FLAG_CHOICES, index=bui.FLAG_CHOICES.index(sel.flag), disabled=split != "test",
                       help="Flags exist for test predictions only (the detector is fitted on training images).")
    conf = b.slider("Confidence (max softmax)", 0.0, 1.0, (sel.conf_lo, sel.conf_hi), 0.01)
    sorts = list(bui.SORTS)
    sort = c.selectbox("Sort by", sorts, index=sorts.index(sel.sort), help="Agreement: test split only (train rows keep index order).")
sel = bui.Selection(split=split, true=tuple(sorted(true)), predicted=tuple(sorted(pred)), outcome=outcome,
                    flag=flag if split == "test" else "all", conf_lo=float(conf[0]), conf_hi=float(conf[1]), sort=sort)
wanted = sel.to_query()
for key in bui.QUERY_KEYS:
    if key in wanted and q.get(key) != wanted[key]:
        q[key] = wanted[key]
    elif key not in wanted and key in q:
        del q[key]

detection = ui.detection(ws) if split == "test" else None
table = bui.predictions(ws, split, detection, bui.chosen_flag_rule())
shown = bui.select(table, sel)
st.markdown(f"**{len(shown)}** of {len(table)} {split} predictions match "
            f"({int((~shown['correct']).sum())} errors, {int(shown['flagged'].sum())} flagged).")

# ---- the open prediction
opened = q.get("image")
if opened is not None and opened.isdigit() and int(opened) < len(table):
    i = int(opened)
    row = table.loc[i]
    with st.container(border=True):
        head, close = st.columns([6, 1])
        head.markdown(f"**{split} image {row['id']}**", help=f"Position {i} in the {split} split (the CSV's `index`, the URL's `image`).")
        if close.button("Close", key="close-detail"):
            del q["image"]
            st.rerun()
        pred_i = int(row["predicted"])
        left, mid, right = st.columns([1, 1, 3])
        left.image(ui.sample_images(ws, split, [i])[0], caption=f"true {classes[row['true']]} · predicted {classes[pred_i]} ({row['confidence']:.2f})", width="stretch")
        mid.image(bui.gradcam_regions(ws, split, [i], [pred_i])[0], caption=f"Grad-CAM toward {classes[pred_i]} (outline: ≥ half its peak)", width="stretch")
        gradcam_layer_note(ws, mid)
        lines = [f"- outcome: **{'correct' if row['correct'] else 'error'}**"]
        if split == "test" and detection is not None:
            lines.append(f"- agreement − class mean: **{row['agreement']:+.3f}**" + (" · **flagged**" if row["flagged"] else " · not flagged"))
            lines.append(f"- proposed class (re-ranked by agreement among the top classes): **{classes[int(row['proposed'])]}**")
            runs = bui.treatment_predictions(ws)
            if runs is not None:
                lines.append(f"- control (CE fine-tune, seed {runs['seed']}) predicts **{classes[runs['control'][i]]}**; treated "
                             f"(λ1={runs['lambda1']:g}, λ2={runs['lambda2']:g}) predicts **{classes[runs['treated'][i]]}** (run `{runs['run_id']}`)")
            else:
                lines.append("- no finished treatment run with per-image control predictions yet (see **Treatment**)")
        left.markdown("\n".join(lines[:1]))
        mid.markdown("\n".join(lines[1:]))
        if split == "test" and detection is not None:
            filters = ui.global_filters(ws)
            local = ui.local_masks(ws, "test", [i], [pred_i])[0]
            global_set = filters.sets(detection["config"]["freq_threshold"])[pred_i]
            freq = filters.histogram[pred_i] / max(filters.histogram[pred_i].max(), 1)
            activation = ws.extractions.get("test").features[i]
            right.plotly_chart(viz.agreement_bar(local, global_set, freq, f"Filters of this image vs class {classes[pred_i]}", activation=activation),
                               width="stretch")
            right.caption("Up: how often the filter is an MC filter of the predicted class (its global set G). Down: the image's own MC "
                          "filters, by activation. Agreement is their overlap (recall, precision, F1 of the sets, not classification metrics).")

# ---- tiles
PER_PAGE = 24
pages = max(1, int(np.ceil(len(shown) / PER_PAGE)))
page_no = st.number_input(f"Page (of {pages})", 1, pages, 1, key=f"page-{sorted(wanted.items())}")
chunk = shown.iloc[(page_no - 1) * PER_PAGE : page_no * PER_PAGE]
if chunk.empty:
    st.info("Nothing matches these filters.")
else:
    tiles = ui.sample_images(ws, split, chunk.index)
    rows = list(zip(chunk.index, chunk.itertuples()))
    for start in range(0, len(rows), 8):  # a row of columns per 8 tiles, the caption under the button: images and buttons line up
        grid = st.columns(8)
        for j, (i, row) in enumerate(rows[start : start + 8]):
            col = grid[j]
            mark = ("✓" if row.correct else "✗") + (" ⚑" if row.flagged else "")
            agreement = "" if np.isnan(row.agreement) else f" · agr {row.agreement:+.2f}"
            col.image(tiles[start + j], width="stretch")
            if col.button("open", key=f"open-{split}-{i}", width="stretch"):
                q["image"] = str(int(i))
                st.rerun()
            col.caption(f"{mark} true {classes[row.true]} · pred {classes[row.predicted]} ({row.confidence:.2f}){agreement}")

export = shown.assign(true=shown["true"].map(lambda k: classes[k]), predicted=shown["predicted"].map(lambda k: classes[k]),
                      proposed=shown["proposed"].map(lambda k: classes[k]))
st.download_button("Download these predictions (CSV)", export.to_csv(index_label="index"), f"{split}_predictions.csv", "text/csv")
