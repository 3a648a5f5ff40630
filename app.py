"""geohier dashboard: `streamlit run app.py`.

Navigation and the home page. Every other page is a thin script in views/ (not pages/: Streamlit would also treat that folder as its older page list).
The tab icon is a local image (views/icon.png) and the navigation icons are emoji, not
``:material/...`` names: a Material page icon makes every browser fetch it from
fonts.gstatic.com, and the dashboard makes no off-host request (tests/test_browser.py).
"""

from pathlib import Path

import streamlit as st

from geohier.runs import list_runs
from pipeline.quickstart import next_step
from views._common import manifest_summary, manifest_version, workspace

ICON = Path(__file__).resolve().parent / "views" / "icon.png"  # served by this server: no off-host request
st.set_page_config(page_title="geohier", page_icon=ICON, layout="wide")


def home() -> None:
    ws = workspace()
    st.title("geohier")
    st.caption("Where was this street photo taken? A multi-level quadtree classifier and its research loop.")
    summary = manifest_summary(str(ws.data_dir), str(ws.models_dir), manifest_version(ws))
    runs = list_runs(ws.models_dir)
    c1, c2, c3 = st.columns(3)
    c1.metric("Images", f"{summary['images']:,}")
    c2.metric("Cells with data (L8)", f"{summary['cells']:,}")
    c3.metric("Training runs", len(runs))
    if summary["by_source"]:
        st.write("By source: " + ", ".join(f"{k} {v:,}" for k, v in sorted(summary["by_source"].items())))
    step = next_step(ws)
    st.subheader("Next step")
    st.info(step["text"])
    if step.get("command"):
        st.code(step["command"], language="bash")
    st.caption(f"Workspace: data `{ws.data_dir}` · models `{ws.models_dir}`")


pages = [
    st.Page(home, title="Home", icon="🏠", default=True),
    st.Page("views/coverage.py", title="Coverage", icon="🗺️"),
    st.Page("views/data.py", title="Data", icon="📊"),
    st.Page("views/train.py", title="Train", icon="🏋️"),
    st.Page("views/accuracy.py", title="Accuracy", icon="🎯"),
    st.Page("views/predict.py", title="Predict", icon="📍"),
]
st.navigation(pages).run()
