"""Folium maps of grid cells that draw with no internet, shared by the pages and the CLI.

Offline: folium loads Leaflet, jQuery, Bootstrap and Font Awesome from CDNs. A map made
by ``base_map`` carries only Leaflet 1.9.4, read from the PyPI package
django-js-lib-leaflet and embedded as ``data:`` URLs (the CSS with its icons inlined),
so the same map works as a standalone HTML file (``offline_html``) and inside Streamlit
through streamlit-folium, whose component loads a map's ``default_js``/``default_css``
links with ordinary ``<script src>``/``<link href>`` tags: a data URL needs no server.
Default marker icons are inlined too. Web tiles are an optional layer, off by default,
that stays blank offline.

Small HTML: ``cells_layer`` is ONE GeoJSON layer however many cells it holds, and it
embeds cell *keys*, not polygons. A few lines of JavaScript turn each key into its
rectangle, its id ("0/1/2") and its properties when the page loads, so a cell costs
~15 bytes of HTML instead of a ~200-byte GeoJSON polygon (or a ~2 kB folium layer of its
own). Colours are a palette plus one index per cell; string properties (country names)
are dictionary-encoded. Cells draw on a canvas renderer (25,000 SVG paths would crawl).

A map that drew leaves ``data-geohier-cells="<n>"`` on its ``.leaflet-container`` and a
``<canvas>`` in its ``.leaflet-overlay-pane`` (what the browser test looks for).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import folium
import numpy as np
import pandas as pd
from branca.element import MacroElement
from folium.map import Layer
from folium.template import Template

from geohier import geography, grid
from geohier.charts import BEST_COLOR, TRUE_COLOR
from geohier.errors import InputError, WorkspaceError

NEIGHBOUR_COLOR = "#756bb1"  # purple: training images a refined guess was averaged from
REGION_COLOR = "#1f4fd1"  # blue: a coverage region, or the cells of a "not sure" answer
LAND_DATA = "#2ca25f"  # green: land with images
LAND_NO_DATA = "#9e9e9e"  # grey: land without images
OCEAN = "#6baed6"  # blue: ocean
OCEAN_BACKGROUND = "#a6cee3"  # the map's own background, standing for ocean cells left out
STATUS_COLORS = {"land_data": LAND_DATA, "land_no_data": LAND_NO_DATA, "ocean": OCEAN}
STATUS_LABELS = {"land_data": "Land with images", "land_no_data": "Land without images",
                 "ocean": "Ocean"}
OCEAN_CELLS_MAX_LEVEL = 6  # finer levels draw ocean as the background, not cell by cell
HIGHLIGHT_FROM_LEVEL = 5  # finer levels also ring the cells with images
MAX_MAP_CELLS = 150_000  # beyond this, a coverage map draws only the cells with images
OSM_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
_CDN = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


# --------------------------------------------------------------------------- Leaflet files


def _leaflet_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("js_lib_leaflet")
    if spec is None or not spec.submodule_search_locations:
        raise WorkspaceError("the package django-js-lib-leaflet is not installed; "
                             "run `pip install -r requirements.txt`")
    return Path(next(iter(spec.submodule_search_locations))) / "static" / "js_lib_leaflet"


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@lru_cache(maxsize=1)
def leaflet_assets() -> dict[str, str]:
    """Leaflet 1.9.4 from django-js-lib-leaflet as data URLs: ``js``, ``css`` (its images
    inlined), and the default marker's ``icon``, ``icon_2x`` and ``shadow`` PNGs."""
    d = _leaflet_dir()
    js = (d / "leaflet.js").read_text(encoding="utf-8")
    js = re.sub(r"//# sourceMappingURL=\S+\s*$", "", js)  # no request for a .map file
    css = (d / "leaflet.css").read_text(encoding="utf-8")
    css = re.sub(r"url\(images/([\w.-]+\.png)\)",
                 lambda mt: f"url({_data_url('image/png', (d / 'images' / mt.group(1)).read_bytes())})",
                 css)
    png = lambda name: _data_url("image/png", (d / "images" / name).read_bytes())  # noqa: E731
    return {"js": _data_url("text/javascript", js.encode("utf-8")),
            "css": _data_url("text/css", css.encode("utf-8")),
            "icon": png("marker-icon.png"), "icon_2x": png("marker-icon-2x.png"),
            "shadow": png("marker-shadow.png")}


def _json(obj) -> str:
    # Compact JSON that is also safe inside <script>.
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


# --------------------------------------------------------------------------- elements


class _MapSetup(MacroElement):
    """Inline default-marker icons, the ocean background, and panes, once per map."""

    _template = Template("""
        {% macro script(this, kwargs) %}
        L.Icon.Default.imagePath = "";
        L.Icon.Default.mergeOptions({{ this.icons }});
        (function (map) {
            map.getContainer().style.background = {{ this.background|tojson }};
            var pane = map.createPane("geohierOutlines");
            pane.style.zIndex = 450;
            pane.style.pointerEvents = "none";
        })({{ this._parent.get_name() }});
        {% endmacro %}
    """)

    def __init__(self, background: str):
        super().__init__()
        self._name = "GeohierSetup"
        a = leaflet_assets()
        self.icons = _json({"iconUrl": a["icon"], "iconRetinaUrl": a["icon_2x"], "shadowUrl": a["shadow"]})
        self.background = background


class OutlineLayer(Layer):
    """A non-interactive GeoJSON line layer drawn above the cells (country borders)."""

    _template = Template("""
        {% macro script(this, kwargs) %}
        var {{ this.get_name() }} = L.geoJson({{ this.data }}, {
            renderer: L.canvas({pane: "geohierOutlines"}),
            pane: "geohierOutlines",
            interactive: false,
            style: {{ this.style }}
        });
        {% endmacro %}
    """)

    def __init__(self, geojson_text: str, *, name: str = "Country outlines", color: str = "#444444",
                 weight: float = 0.7, show: bool = True):
        super().__init__(name=name, overlay=True, control=True, show=show)
        self._name = "OutlineLayer"
        self.data = geojson_text.replace("</", "<\\/")
        self.style = _json({"color": color, "weight": weight, "opacity": 0.8, "fill": False})


class CellsLayer(Layer):
    """Many grid cells of one level as one GeoJSON layer built in the browser from keys.

    Made by ``cells_layer``; see there.
    """

    _template = Template("""
        {% macro script(this, kwargs) %}
        var {{ this.get_name() }} = (function (d, o) {
            var feats = [];
            var names = Object.keys(d.props);
            for (var i = 0; i < d.keys.length; i++) {
                var lev = d.depths ? d.depths[i] : d.level;  // adaptive cells: a depth per cell
                var n = Math.pow(2, lev), w = 360 / n, h = 180 / n;
                var k = d.keys[i], row = 0, col = 0, id = [];
                for (var j = lev - 1; j >= 0; j--) {
                    var dig = Math.floor(k / Math.pow(4, j)) % 4;
                    row = row * 2 + (dig >> 1); col = col * 2 + (dig & 1); id.push(dig);
                }
                var west = -180 + col * w, north = 90 - row * h, east = west + w, south = north - h;
                var p = {cell: id.join("/"), _fill: d.palette[d.color[i]],
                         _alpha: d.alpha ? d.alpha[i] : o.fillOpacity};
                for (var f = 0; f < names.length; f++) {
                    var c = d.props[names[f]];
                    p[names[f]] = Array.isArray(c) ? c[i] : c.values[c.index[i]];
                }
                feats.push({type: "Feature", properties: p, geometry: {type: "Polygon",
                    coordinates: [[[west, south], [east, south], [east, north], [west, north], [west, south]]]}});
            }
            var layer = L.geoJson({type: "FeatureCollection", features: feats}, {
                renderer: L.canvas({padding: 0.5}),
                interactive: o.interactive,
                style: function (feat) {
                    return {fill: o.fill, fillColor: feat.properties._fill, fillOpacity: feat.properties._alpha,
                            stroke: o.weight > 0, color: o.color, weight: o.weight, opacity: o.opacity};
                }
            });
            if (d.tooltip.length) {
                var esc = function (s) {
                    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
                };
                layer.bindTooltip(function (l) {
                    var p = l.feature.properties, rows = "";
                    for (var t = 0; t < d.tooltip.length; t++) {
                        var v = p[d.tooltip[t][0]];
                        if (v === "" || v === null || v === undefined) v = "\u2013";
                        else if (typeof v === "number") v = v.toLocaleString();
                        rows += "<tr><th style='text-align:left;padding-right:8px'>" + esc(d.tooltip[t][1]) +
                                "</th><td>" + esc(v) + "</td></tr>";
                    }
                    return "<table>" + rows + "</table>";
                }, {sticky: true});
            }
            layer.on("add", function () {
                var el = this._map.getContainer();
                el.setAttribute("data-geohier-cells",
                    (parseInt(el.getAttribute("data-geohier-cells") || "0", 10) + d.keys.length).toString());
            });
            return layer;
        })({{ this.payload }}, {{ this.options_json }});
        {% endmacro %}
    """)

    def __init__(self, payload: str, options: dict, *, name: str, show: bool = True):
        super().__init__(name=name, overlay=True, control=True, show=show)
        self._name = "CellsLayer"
        self.payload = payload
        self.options_json = _json(options)


class Legend(MacroElement):
    """A Leaflet control listing colour swatches and labels."""

    _template = Template("""
        {% macro script(this, kwargs) %}
        (function (map) {
            var legend = L.control({position: {{ this.position|tojson }}});
            legend.onAdd = function () {
                var div = L.DomUtil.create("div", "geohier-legend");
                div.style.cssText = "background:rgba(255,255,255,0.92);padding:6px 9px;border-radius:5px;" +
                    "font:12px/1.5 sans-serif;box-shadow:0 1px 4px rgba(0,0,0,0.3);color:#222";
                div.innerHTML = {{ this.html|tojson }};
                return div;
            };
            legend.addTo(map);
        })({{ this._parent.get_name() }});
        {% endmacro %}
    """)

    def __init__(self, html: str, position: str = "bottomright"):
        super().__init__()
        self._name = "Legend"
        self.html = html
        self.position = position


# --------------------------------------------------------------------------- public API


def base_map(center: tuple[float, float] = (20.0, 0.0), zoom: int = 2, *, outlines: bool = True,
             tiles: bool = False, layer_control: bool = True, background: str = OCEAN_BACKGROUND,
             height: str | int = "100%") -> folium.Map:
    """An offline folium map: Leaflet embedded, no CDN link, no tiles by default.

    ``outlines`` adds Natural Earth country borders (from local data) above the cells;
    ``tiles`` adds OpenStreetMap tiles as an optional layer, off by default (blank
    offline); ``background`` colours the map where nothing is drawn (the ocean).
    Add layers with ``cells_layer(...).add_to(m)``, then call ``finish(m)`` (or let
    ``offline_html`` do it) to add the layer control.
    """
    m = folium.Map(location=list(center), zoom_start=zoom, tiles=None, min_zoom=1,
                   world_copy_jump=False, control_scale=True, height=height)
    a = leaflet_assets()
    # Instance attributes: folium's class-level lists must stay untouched.
    m.default_js = [("leaflet", a["js"])]
    m.default_css = [("leaflet_css", a["css"])]
    m.add_child(_MapSetup(background), name="geohier_setup")
    if tiles:
        folium.TileLayer(OSM_TILES, name="OpenStreetMap tiles (online only)", overlay=True,
                         show=False, attr="&copy; OpenStreetMap contributors", max_zoom=19).add_to(m)
    if outlines:
        OutlineLayer(geography.country_outlines_json()).add_to(m)
    m._geohier_layer_control = layer_control
    return m


def finish(m: folium.Map) -> folium.Map:
    """Add the layer control (once, last, so that it lists every layer)."""
    if getattr(m, "_geohier_layer_control", False) and not getattr(m, "_geohier_finished", False):
        folium.LayerControl(collapsed=True).add_to(m)
        m._geohier_finished = True
    return m


def _encode_column(values) -> list | dict:
    arr = np.asarray(values)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64).tolist()
    if arr.dtype.kind == "f":
        return [None if not np.isfinite(v) else round(float(v), 4) for v in arr]
    uniq, index = np.unique(arr.astype(str), return_inverse=True)
    return {"values": uniq.tolist(), "index": index.tolist()}


def cells_layer(keys, level: int, colors, *, fields: Mapping[str, Sequence] | None = None,
                tooltip: Sequence[tuple[str, str]] | None = None, name: str = "Cells",
                fill: bool = True, fill_opacity: float = 0.7, alpha=None,
                stroke_color: str = "#ffffff", weight: float = 0.5, opacity: float = 0.8,
                interactive: bool = True, show: bool = True) -> CellsLayer:
    """One GeoJSON layer of many cells of ``level``.

    keys: cell keys (``grid`` keys) of that level. ``level`` may also be an array of one
    depth per cell (adaptive cells, each key read at its own depth; ``cells_of``). colors: one CSS colour for all, or one
    per cell. fields: extra per-cell properties {name: values} (numbers or strings).
    tooltip: [(property, label)] rows shown on hover; "cell" (the id) is always a
    property. alpha: optional per-cell fill opacity (0-1). fill=False with a
    ``stroke_color`` and ``weight`` draws outlines only (e.g. parent cells).

    >>> layer = cells_layer([0, 3], 1, ["#ff0000", "#00ff00"], tooltip=[("cell", "Cell")])
    >>> type(layer).__name__
    'CellsLayer'
    """
    keys = np.asarray(keys, dtype=np.int64).ravel()
    depths = None
    if np.ndim(level):  # one depth per cell
        depths = np.asarray(level, dtype=np.int64).ravel()
        if depths.size != keys.size:
            raise InputError(f"{depths.size} depths for {keys.size} cells")
        if depths.size and (depths.min() < 1 or depths.max() > grid.MAX_LEVEL):
            raise InputError(f"cell depths must be within [1, {grid.MAX_LEVEL}]")
        if keys.size and (keys.min() < 0 or np.any(keys >= 4**depths)):
            raise InputError("cell keys must be within [0, 4**depth) at their depths")
        level = int(depths.max()) if depths.size else 1
    level = grid.check_level(level)
    if depths is None and keys.size and (keys.min() < 0 or keys.max() >= 4**level):
        raise InputError(f"cell keys must be within [0, {4**level}) at level {level}")
    if isinstance(colors, str):
        colors = [colors] * len(keys)
    colors = np.asarray(list(colors), dtype=object)
    if len(colors) != len(keys):
        raise InputError(f"{len(colors)} colours for {len(keys)} cells")
    palette, color_index = np.unique(colors.astype(str), return_inverse=True)
    props = {}
    for key, values in (fields or {}).items():
        if len(values) != len(keys):
            raise InputError(f"field {key!r} has {len(values)} values for {len(keys)} cells")
        props[key] = _encode_column(values)
    known = {"cell", *props}
    for prop, _ in tooltip or ():
        if prop not in known:
            raise InputError(f"tooltip property {prop!r} is not a field; known: {sorted(known)}")
    payload = {"level": level, "keys": keys.tolist(), "palette": palette.tolist(),
               "color": color_index.astype(np.int64).tolist(), "props": props,
               "alpha": None if alpha is None else np.round(np.asarray(alpha, dtype=float), 3).tolist(),
               "tooltip": [list(t) for t in tooltip or ()]}
    if depths is not None:
        payload["depths"] = depths.tolist()
    options = {"fill": bool(fill), "fillOpacity": float(fill_opacity), "color": stroke_color,
               "weight": float(weight), "opacity": float(opacity), "interactive": bool(interactive)}
    return CellsLayer(_json(payload), options, name=name, show=show)


def cells_of(ids: Sequence[str], level: int):
    """(keys, level) for ``cells_layer`` from cell ids: ``level`` itself when every id is
    of that level (fixed levels), else the array of each id's depth (adaptive cells).

    >>> cells_of(["1/3", "2"], 2)
    (array([7, 2]), array([2, 1]))
    """
    keys, depths = grid.ids_to_depth_keys(ids)
    return (keys, level) if np.all(depths == level) else (keys, depths)


def add_legend(m: folium.Map, items: Sequence[tuple[str, str]], title: str | None = None,
               note: str | None = None, position: str = "bottomright") -> Legend:
    """Add a legend of (colour, label) rows, with an optional title and note."""
    import html as _html

    rows = "".join(
        f"<div><span style='display:inline-block;width:12px;height:12px;margin-right:6px;"
        f"vertical-align:-1px;border:1px solid #777;background:{_html.escape(color)}'></span>"
        f"{_html.escape(label)}</div>" for color, label in items)
    head = f"<b>{_html.escape(title)}</b>" if title else ""
    tail = f"<div style='color:#555;max-width:220px'>{_html.escape(note)}</div>" if note else ""
    legend = Legend(head + rows + tail, position)
    m.add_child(legend)
    return legend


def add_marker(m: folium.Map, lat: float, lon: float, *, tooltip: str | None = None,
               color: str = "#d62728", radius: int = 7) -> folium.CircleMarker:
    """A circle marker (needs no image files) at one point."""
    marker = folium.CircleMarker([float(lat), float(lon)], radius=radius, color="#222222", weight=1.5,
                                 fill=True, fill_color=color, fill_opacity=0.95, tooltip=tooltip)
    marker.add_to(m)
    return marker


def color_scale(values, *, log: bool = False, vmin: float | None = None, vmax: float | None = None,
                colors: Sequence[str] = ("#ffffcc", "#a1dab4", "#41b6c4", "#2c7fb8", "#253494"),
                steps: int = 101) -> list[str]:
    """Hex colours for numbers along a colour ramp (``log`` for counts: log1p scale).
    Quantised to ``steps`` colours so a layer's palette stays small.

    >>> color_scale([0, 5, 10], colors=("#000000", "#ffffff"))
    ['#000000', '#808080', '#ffffff']
    """
    v = np.asarray(values, dtype=float)
    if log:
        v = np.log1p(np.clip(v, 0, None))
        vmin = None if vmin is None else float(np.log1p(vmin))
        vmax = None if vmax is None else float(np.log1p(vmax))
    lo = float(np.nanmin(v)) if vmin is None and v.size else (vmin or 0.0)
    hi = float(np.nanmax(v)) if vmax is None and v.size else (vmax if vmax is not None else 1.0)
    t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    t = np.nan_to_num(np.round(t * (steps - 1)) / (steps - 1))
    stops = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in colors], dtype=float)
    pos = np.linspace(0, 1, len(stops))
    rgb = np.rint(np.stack([np.interp(t, pos, stops[:, ch]) for ch in range(3)], axis=-1)).astype(int)
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb]


def offline_html(m: folium.Map) -> str:
    """The map as one standalone HTML document with Leaflet inlined (opens offline).

    Raises WorkspaceError if any script or stylesheet would still come from the network.
    """
    finish(m)
    html = m.get_root().render()
    bad = _CDN.search(html)
    if bad:
        raise WorkspaceError(f"map HTML still references the network: {bad.group(0)!r}")
    return html


def network_references(html: str) -> list[str]:
    """Every <script src> / <link href> in ``html`` that points at http(s) (for tests)."""
    return [mt.group(0) for mt in _CDN.finditer(html)]


# --------------------------------------------------------------------------- coverage


def coverage_map(table: pd.DataFrame, level: int, *, include_ocean: bool | None = None,
                 tiles: bool = True) -> folium.Map:
    """The coverage map of ``geography.coverage_table(ws, level)``'s table.

    Green = land with images, grey = land without images, blue = ocean. Above
    OCEAN_CELLS_MAX_LEVEL (unless ``include_ocean``) ocean cells are not drawn one by one:
    the map's blue background stands for them, which keeps level 8 to ~25k features.
    Above HIGHLIGHT_FROM_LEVEL the cells with images are also ringed in green.
    """
    level = grid.check_level(level)
    if include_ocean is None:
        include_ocean = level <= OCEAN_CELLS_MAX_LEVEL
    rows = table if include_ocean else table[table["status"] != "ocean"]
    notes = [] if include_ocean else ["Ocean cells are the blue background, not drawn one by one."]
    if len(rows) > MAX_MAP_CELLS:
        # Level 10 has ~400k land cells: more than a browser tab should build. Keep the
        # cells with images; the outlines show the land.
        rows = rows[rows["status"] == "land_data"]
        notes.append(f"Over {MAX_MAP_CELLS:,} cells: only cells with images are drawn.")
    m = base_map(tiles=tiles)
    cells_layer(
        rows["key"].to_numpy(), level,
        rows["status"].astype(str).map(STATUS_COLORS).to_numpy(),
        fields={"country": rows["country"].to_numpy(), "images": rows["images"].to_numpy(),
                "land": [f"{round(100 * f)} %" for f in rows["land_fraction"].to_numpy()]},
        tooltip=[("cell", "Cell"), ("country", "Country"), ("images", "Images"), ("land", "Land")],
        name=f"Level {level} cells", weight=0.5 if level <= 6 else 0.25,
    ).add_to(m)
    if level > HIGHLIGHT_FROM_LEVEL:
        # A fine cell is a pixel or two at world zoom: ring the cells with images so that
        # sparse data stays visible.
        data = rows[rows["status"] == "land_data"]
        if len(data):
            cells_layer(data["key"].to_numpy(), level, LAND_DATA, fill=False, stroke_color=LAND_DATA,
                        weight=2.5, opacity=0.9, interactive=False,
                        name="Cells with images (rings)").add_to(m)
    counts = geography.status_counts(table)
    add_legend(m, [(STATUS_COLORS[s], f"{STATUS_LABELS[s]}: {counts[s]:,}")
                   for s in ("land_data", "land_no_data", "ocean")],
               title=f"Coverage, level {level}",
               note=" ".join(notes) or None)
    return finish(m)


# --------------------------------------------------------------------------- images per cell

IMAGES_RAMP = ("#ffeda0", "#feb24c", "#fd8d3c", "#e31a1c", "#800026")  # warm: stands out on the blue sea
IMAGES_MAP_MAX_CELLS = 60_000  # one canvas layer copes; beyond, the browser would crawl


def images_map(keys, counts, countries, level: int) -> folium.Map:
    """The Data page's map: each cell with images coloured by its count (log scale),
    with its country in the tooltip, zoomed to the data (clipped at +-80 deg latitude),
    and a legend at powers of ten. Raises an InputError over IMAGES_MAP_MAX_CELLS cells.
    ``level`` may be one depth per cell (adaptive cells)."""
    keys = np.asarray(keys)
    n = np.asarray(counts)
    mixed = bool(np.ndim(level))
    if len(keys) > IMAGES_MAP_MAX_CELLS:
        raise InputError(f"{len(keys):,} cells are too many to draw (at most {IMAGES_MAP_MAX_CELLS:,}); "
                         "inspect a coarser level")
    m = base_map()
    top = max(int(n.max()) if n.size else 1, 1)
    colours = color_scale(n, log=True, vmin=1, vmax=max(top, 2), colors=IMAGES_RAMP)
    cells_layer(keys, level, colours, fields={"images": n, "country": list(countries)},
                tooltip=[("cell", "Cell"), ("country", "Country"), ("images", "Images")],
                name="Images per adaptive cell" if mixed else f"Images per level-{level} cell", fill_opacity=0.8,
                weight=0.2 if mixed or level > 6 else 0.5).add_to(m)
    if keys.size:
        box = grid.depth_bounds(keys, level) if mixed else grid.key_bounds(keys, level)
        w, south, e, north = (float(f(a)) for f, a in zip((np.min, np.min, np.max, np.max), box, strict=True))
        m.fit_bounds([[max(south, -80.0), w], [min(north, 80.0), e]])  # zoom to the data
    stops = sorted({1, *[10**k for k in range(1, 7) if 10**k < top], top})
    legend = color_scale(stops, log=True, vmin=1, vmax=max(top, 2), colors=IMAGES_RAMP)
    add_legend(m, list(zip(legend, [f"{s:,}" for s in stops], strict=True)),
               title="Images per cell", note="log colour scale")
    return m


# --------------------------------------------------------------------------- a prediction


def prediction_key(pred) -> str:
    """A short digest of what ``prediction_map`` draws for ``pred`` (its kept cells, region,
    guesses and truth): a page gives the map component this in its key, since a mounted
    map only redraws when its key changes.

    >>> from types import SimpleNamespace as N
    >>> c = N(cell="0/1", prob=0.5, lat=1.0, lon=2.0)
    >>> a = N(levels={1: [c]}, best=c, region=None, true=None)
    >>> b = N(levels={1: [c, c]}, best=c, region=None, true=None)
    >>> prediction_key(a) == prediction_key(a), prediction_key(a) == prediction_key(b)
    (True, False)
    """
    import hashlib

    best, region = pred.best, getattr(pred, "region", None)
    refined = getattr(best, "refined", None)
    parts = [[lv, [(c.cell, round(float(c.prob), 6)) for c in cands]] for lv, cands in sorted(pred.levels.items())]
    parts.append([best.cell, round(float(best.lat), 6), round(float(best.lon), 6), refined is not None])
    parts.append(None if region is None else [list(region.cells), list(getattr(region, "rest", [])), region.source,
                                              round(float(region.coverage or 0), 4)])
    parts.append(None if not pred.true else [pred.true.get("lat"), pred.true.get("lon")])
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def prediction_map(pred, predictor) -> folium.Map:
    """The kept finest-level cells coloured by probability, the kept cells of the coarser
    levels outlined, the coverage region (or a "not sure" answer's region) outlined in blue,
    the best guess (red) and the EXIF position (green) marked; a refined
    guess also shows the training images it was averaged from (purple) and the cell's own
    position (white). Offline, like every map here."""
    finest = max(pred.levels)
    best = pred.best
    m = base_map(center=(best.lat, best.lon), zoom=3, tiles=True)
    levels = sorted(pred.levels)
    for i, lv in enumerate(levels[:-1]):  # coarse levels: outlines, thicker further up
        cands = pred.levels[lv]
        keys, depth = cells_of([c.cell for c in cands], lv)
        cells_layer(keys, depth, "#000000", fill=False, stroke_color="#333333",
                    weight=max(1.0, 3.0 - i * 0.7), opacity=0.9, interactive=False,
                    name=f"Level {lv}: {len(cands)} kept").add_to(m)
    cands = pred.levels[finest]
    keys, depth = cells_of([c.cell for c in cands], finest)
    probs = np.array([c.prob for c in cands])
    colors = color_scale(probs, vmin=0.0, vmax=max(float(probs.max()), 1e-9),
                         colors=("#fff5eb", "#fdae6b", "#e6550d", "#7f2704"))
    cells_layer(keys, depth, colors, fill_opacity=0.75, stroke_color="#7f2704", weight=1.0,
                fields={"prob": [f"{p:.1%}" for p in probs],
                        "rank": list(range(1, len(cands) + 1)),
                        "country": [c.country or "" for c in cands],
                        "place": [c.place or "" for c in cands]},
                tooltip=[("cell", "Cell"), ("rank", "Rank"), ("prob", "Probability"),
                         ("country", "Country"), ("place", "Nearest town")],
                name=f"Level {finest}: {len(cands)} kept").add_to(m)
    region = getattr(pred, "region", None)  # a coverage region or the "not sure" answer's cells
    if region is not None:
        what = f"{region.coverage:.0%} coverage region" if region.source == "conformal" else "Region"
        if len(region.cells):
            rkeys, rdepth = cells_of(region.cells, finest)
            cells_layer(rkeys, rdepth, REGION_COLOR, fill=True, fill_opacity=0.08, stroke_color=REGION_COLOR,
                        weight=1.5, opacity=0.9, interactive=False,
                        name=f"{what}: {len(region.cells)} cells").add_to(m)
        if getattr(region, "rest", None):  # coarser cells less their class sub-cells: polygons with holes
            from geohier.conformal import region_geojson

            rests = [f for f in region_geojson(region)["features"] if f["properties"].get("rest")]
            folium.GeoJson({"type": "FeatureCollection", "features": rests}, name=f"{what}: {len(rests)} rests",
                           style_function=lambda _: {"color": REGION_COLOR, "weight": 1.5, "dashArray": "6 4",
                                                     "fillColor": REGION_COLOR, "fillOpacity": 0.05}).add_to(m)
    refined = getattr(best, "refined", None)  # retrieval refinement moved the guess (geohier.refine)
    if refined is not None:
        for nb in refined.neighbours:
            add_marker(m, nb["lat"], nb["lon"], color=NEIGHBOUR_COLOR, radius=4,
                       tooltip=f"Training image {nb['id']}: similarity {nb['sim']:.3f}, weight {nb['weight']:.0%}")
        add_marker(m, refined.cell_lat, refined.cell_lon, color="#ffffff", radius=5,
                   tooltip=f"Cell {best.cell}'s position (the unrefined guess)")
    add_marker(m, best.lat, best.lon, color=BEST_COLOR,
               tooltip=f"{'Refined best guess' if refined is not None else 'Best guess'} {best.cell} "
                       f"({best.prob:.1%}) {best.place or ''}")
    legend = [(BEST_COLOR, "Best guess" if refined is None else
               f"Best guess, refined by {len(refined.neighbours)} nearest training image(s)"),
              ("#e6550d", f"Level {finest} cells (darker = likelier)"),
              ("#ffffff", "Outlines: kept parent cells")]
    if refined is not None:
        legend[1:1] = [(NEIGHBOUR_COLOR, "Nearest training images"), ("#ffffff", "Cell position (unrefined)")]
    if region is not None and region.n_cells:
        rests = f" ({len(region.rest)} the rest of a coarser cell, dashed)" if getattr(region, "rest", None) else ""
        legend.append((REGION_COLOR, f"Region: {region.n_cells:,} cells{rests}, {region.area_km2:,.0f} km²"))
    points = [[c.lat, c.lon] for c in cands]
    if pred.true:
        t = pred.true
        add_marker(m, t["lat"], t["lon"], color=TRUE_COLOR,
                   tooltip=f"True location (EXIF GPS): {t['error_km']:,.0f} km off")
        legend.insert(1, (TRUE_COLOR, f"True location ({t['error_km']:,.0f} km off)"))
        points.append([t["lat"], t["lon"]])
    add_legend(m, legend, title="Prediction")
    w, s, e, n = (np.array([c.bbox for c in cands]).T if cands else ([best.lon],) * 4)
    lats = [float(np.min(s)), float(np.max(n))] + [p[0] for p in points]
    lons = [float(np.min(w)), float(np.max(e))] + [p[1] for p in points]
    m.fit_bounds([[min(lats), min(lons)], [max(lats), max(lons)]], max_zoom=8)
    return finish(m)


# --------------------------------------------------------------------------- probability map

PROB_RAMP = ("#fff7ec", "#fdd49e", "#fc8d59", "#d7301f", "#7f0000")  # warm: stands out on the blue sea
PROB_DECADES = 6  # the colour scale spans this many powers of ten below the top cell


def log_prob_scale(logp, decades: int = PROB_DECADES) -> np.ndarray:
    """Positions in [0, 1] on a log colour scale of natural-log probabilities: 1 at the
    most probable cell, 0 at ``decades`` powers of ten below it (and for anything less,
    probability 0 included). Never decreasing in the probability.

    >>> log_prob_scale([*np.log([1.0, 0.1, 1e-3]), -np.inf], decades=3).round(3).tolist()
    [1.0, 0.667, 0.0, 0.0]
    """
    lp = np.asarray(logp, dtype=np.float64) / np.log(10.0)  # log10 p
    finite = np.isfinite(lp)
    if not finite.any():
        return np.zeros(lp.shape)
    top = float(lp[finite].max())
    t = (np.where(finite, lp, -np.inf) - (top - decades)) / max(int(decades), 1)
    return np.clip(np.nan_to_num(t, neginf=0.0), 0.0, 1.0)


def probability_map(keys, level: int, logp, *, decades: int = PROB_DECADES, best: tuple | None = None,
                    true: tuple | None = None, height: str | int = "100%", depths=None) -> folium.Map:
    """The whole world with EVERY finest class coloured by its joint probability on a log
    scale (``log_prob_scale``), as ONE canvas layer (``cells_layer``): a guess split
    between two continents looks like one. ``keys``: the classes' cell keys at ``level``;
    ``logp``: their natural-log probabilities (-inf: impossible, drawn at the floor).
    ``best`` / ``true``: optional (lat, lon) markers. ``depths``: each cell's depth when
    they differ (adaptive cells; ``Hierarchy.depths``). Offline, like every map here."""
    keys = np.asarray(keys, dtype=np.int64).ravel()
    lp = np.asarray(logp, dtype=np.float64).ravel()
    if lp.size != keys.size:
        raise InputError(f"{lp.size} probabilities for {keys.size} cells")
    t = log_prob_scale(lp, decades)
    colours = color_scale(t, vmin=0.0, vmax=1.0, colors=PROB_RAMP, steps=61)
    p = np.exp(lp)
    m = base_map(center=(20.0, 0.0), zoom=1, height=height)
    cells_layer(keys, level if depths is None else depths, colours, alpha=0.25 + 0.7 * t,
                fields={"p": [f"{v:.2g}" if v > 0 else "0" for v in p]},
                tooltip=[("cell", "Cell"), ("p", "Joint probability")],
                name=f"Level {level}: all {keys.size:,} classes", weight=0.0, fill_opacity=0.8).add_to(m)
    legend = []
    if best is not None:
        add_marker(m, best[0], best[1], color=BEST_COLOR, tooltip="Best guess")
        legend.append((BEST_COLOR, "Best guess"))
    if true is not None:
        add_marker(m, true[0], true[1], color=TRUE_COLOR, tooltip="True location (EXIF GPS)")
        legend.append((TRUE_COLOR, "True location"))
    finite = lp[np.isfinite(lp)]
    top = float(finite.max() / np.log(10.0)) if finite.size else 0.0
    stops = [top - d for d in range(0, int(decades) + 1, 2)]
    legend += list(zip(color_scale(log_prob_scale(np.array(stops) * np.log(10.0), decades)
                                   if finite.size else [0.0] * len(stops), vmin=0.0, vmax=1.0,
                                   colors=PROB_RAMP, steps=61),
                       [f"p = {10 ** s:.0e}" for s in stops], strict=True))
    add_legend(m, legend, title="Joint probability",
               note=f"log colour scale over {int(decades)} powers of ten; every class drawn")
    return finish(m)
