"""Size of the level-8 coverage map's HTML: one GeoJSON layer vs one layer per cell.

The seed drew its coverage map with a folium layer per cell: ``folium.GeoJson`` of the
cell's rectangle with a style function and a tooltip, added to the map one by one. The
baseline below builds exactly that for a sample of cells and scales the per-cell cost to
the same cells that geohier's map draws (every land cell; ocean is the background), over
folium's default map (CDN links: its own page is small). geohier's map is the complete
offline file that ``python -m pipeline coverage --level 8 --html`` writes: Leaflet and
the country outlines inlined, and all cells in one GeoJSON layer built in the browser
from cell keys. The cells' images are synthetic (a third of the land cells hold some), so
all three colours appear. Goal: at least 10x smaller.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from geohier import geography, maps

LEVEL = 8
SAMPLE = 500
GOAL = 10.0


def coverage_table() -> pd.DataFrame:
    geo = geography.cell_geography(LEVEL)
    rng = np.random.default_rng(0)
    land = geo["land"].to_numpy()
    images = np.where(land & (rng.random(len(geo)) < 1 / 3), rng.integers(1, 500, len(geo)), 0)
    status = np.where(images > 0, "land_data", np.where(land, "land_no_data", "ocean"))
    return geo.assign(status=pd.Categorical(status, categories=list(geography.STATUSES)), images=images)


def seed_style_map(rows: pd.DataFrame):
    """One folium.GeoJson per cell, as the seed did."""
    import folium

    m = folium.Map(location=[20, 0], zoom_start=2)
    for row in rows.itertuples():
        w, s = row.lon - 360 / 2**LEVEL / 2, row.lat - 180 / 2**LEVEL / 2
        e, n = w + 360 / 2**LEVEL, s + 180 / 2**LEVEL
        color = maps.STATUS_COLORS[str(row.status)]
        folium.GeoJson(
            {"type": "Feature", "properties": {},
             "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}},
            style_function=lambda _, c=color: {"fillColor": c, "color": c, "weight": 0.3, "fillOpacity": 0.6},
            tooltip=f"{row.cell} · {row.country or 'ocean'} · {row.images} images",
        ).add_to(m)
    return m


def main() -> int:
    table = coverage_table()
    drawn = table[table["status"] != "ocean"]  # the cells geohier's level-8 map draws

    t0 = time.perf_counter()
    ours_html = maps.offline_html(maps.coverage_map(table, LEVEL))
    ours_s = time.perf_counter() - t0
    ours = len(ours_html.encode("utf-8"))

    rng = np.random.default_rng(1)
    sample = drawn.iloc[np.sort(rng.choice(len(drawn), SAMPLE, replace=False))]
    t0 = time.perf_counter()
    empty = len(seed_style_map(sample.iloc[:0]).get_root().render().encode("utf-8"))
    with_sample = len(seed_style_map(sample).get_root().render().encode("utf-8"))
    per_cell = (with_sample - empty) / SAMPLE
    base_s = (time.perf_counter() - t0) * len(drawn) / SAMPLE
    base = empty + per_cell * len(drawn)

    ratio = base / ours
    print(f"level-{LEVEL} coverage map HTML, {len(drawn):,} cells drawn (land; ocean is the background)")
    print(f"  baseline (seed: one folium.GeoJson layer per cell, {SAMPLE}-cell sample scaled): "
          f"{base / 1e6:7.1f} MB   ({per_cell:,.0f} bytes a cell; ~{base_s:,.0f} s to build)")
    print(f"  geohier.maps.coverage_map, one layer, Leaflet + outlines inlined:           "
          f"{ours / 1e6:7.2f} MB   ({ours_s:.1f} s to build)")
    print(f"  smaller by: {ratio:,.0f}x   goal >= {GOAL:.0f}x   {'PASS' if ratio >= GOAL else 'FAIL'}")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
