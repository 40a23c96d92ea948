"""cfdebug dashboard: `streamlit run app.py` (or `make demo`).

The entry point only routes between pages; each page draws the workspace sidebar
(``cfdebug.ui.workspace_page``) and is a thin view over the cfdebug library.
"""

import streamlit as st

st.set_page_config(page_title="cfdebug", page_icon=":material/bug_report:", layout="wide")

PAGES = [
    st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("views/class_filters.py", title="Class filters", icon=":material/filter_alt:", url_path="class_filters"),
    st.Page("views/flagged.py", title="Flagged predictions", icon=":material/flag:", url_path="flagged"),
    st.Page("views/browser.py", title="Sample browser", icon=":material/grid_view:", url_path="browser"),
    st.Page("views/treatment.py", title="Treatment", icon=":material/healing:", url_path="treatment"),
    st.Page("views/revise.py", title="Revise", icon=":material/build:", url_path="revise"),
    st.Page("views/calibration.py", title="Calibration & robustness", icon=":material/tune:", url_path="calibration"),
]

st.navigation(PAGES).run()
