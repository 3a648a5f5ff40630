"""Coverage: which grid cells are ocean, land without images, or land with images."""

from __future__ import annotations

import streamlit as st
from streamlit_folium import st_folium

from geohier import geography, grid, maps
from geohier.errors import GeohierError
from geohier.workspace import Workspace
from views._common import manifest_summary, manifest_version, workspace

LEVELS = list(range(1, geography.MAX_LEVEL + 1))
DEFAULT_LEVEL = 8


@st.cache_data(show_spinner=False, max_entries=8)
def coverage(data_dir: str, models_dir: str, level: int, version: float):
    """The coverage table and its CSV bytes (keyed by level and manifest version)."""
    from pathlib import Path

    table = geography.coverage_table(Workspace(Path(data_dir), Path(models_dir)), level)
    return table, table.to_csv(index=False).encode("utf-8")


def initial_level() -> int:
    """?level=K in the URL, else the default."""
    try:
        level = int(st.query_params.get("level", DEFAULT_LEVEL))
    except ValueError:
        return DEFAULT_LEVEL
    return level if level in LEVELS else DEFAULT_LEVEL


ws = workspace()
st.title("Coverage")
st.caption("Each cell of the grid at one level: green = land with images, grey = land without "
           "images, blue = ocean (Natural Earth 10 m countries, offline).")

with st.sidebar:
    level = st.selectbox(
        "Level", LEVELS, index=LEVELS.index(initial_level()),
        format_func=lambda v: f"{v}  ({4 ** v:,} cells){'  · default' if v in grid.DEFAULT_LEVELS else ''}",
        help="Level k splits the world into 2^k x 2^k lat/lon cells; the model's default levels are 1, 3, 5, 8.",
    )
    statuses = st.multiselect("Table: statuses", list(geography.STATUSES),
                              default=["land_data", "land_no_data"])

summary = manifest_summary(str(ws.data_dir), str(ws.models_dir), manifest_version(ws))
try:
    with st.spinner(f"Land and countries of level {level} (computed once, then cached in {ws.cache_dir})..."):
        table, csv_bytes = coverage(str(ws.data_dir), str(ws.models_dir), level, manifest_version(ws))
except GeohierError as exc:
    st.error(str(exc))
    st.stop()

if summary["images"] == 0:
    st.info("No images yet, so every land cell is grey. Add some with `python -m pipeline demo` "
            "(a synthetic demo world), `python -m pipeline import-photos DIR`, or "
            "`python -m pipeline fetch`.")

counts = geography.status_counts(table)
c1, c2, c3, c4 = st.columns(4)
c1.metric("Land with images", f"{counts['land_data']:,}")
c2.metric("Land without images", f"{counts['land_no_data']:,}")
c3.metric("Ocean", f"{counts['ocean']:,}")
land = counts["land_data"] + counts["land_no_data"]
c4.metric("Land covered", f"{counts['land_data'] / land:.2%}" if land else "–")

st_folium(maps.coverage_map(table, level), height=560, use_container_width=True,
          returned_objects=[], key=f"coverage_map_{level}")

st.subheader("Cells")
view = table[table["status"].isin(statuses)] if statuses else table
st.dataframe(view, hide_index=True,
             column_config={"land_fraction": st.column_config.ProgressColumn(
                 "land fraction", min_value=0.0, max_value=1.0, format="percent")})
st.download_button(f"Download all {len(table):,} cells (CSV)", data=csv_bytes,
                   file_name=f"coverage_L{level}.csv", mime="text/csv")
