"""The dashboard's atlas page (/atlas/<id>, and /atlas/<id>?compare=<id> for two atlases): a stored head atlas's
layer × head grid coloured by role, a legend of roles that filters it, a search box for a head (`L12H3`, `12-3`,
`12.3`), the chosen head's card (scores with rank and percentile, roles, links to each run's page and, on request,
its attention on a sample of one of the runs, drawn by the run page's own machinery: `Dashboard.show_attention`),
the role overlap matrix, and the roles of two atlases matched by layer and head (`interp.atlases.compare_atlases`).

Functions of a `Dashboard` and their inputs, as the run page's callbacks are: tested without a browser.
"""

from __future__ import annotations

import math
import re
from urllib.parse import quote

import dash
import pandas as pd
from dash import Input, Output, State, ctx, dash_table, dcc, html
from dash.dash_table.Format import Format, Scheme

from interp.atlases import Atlas, compare_atlases
from interp.store import CorruptRunError, is_atlas

from . import figures
from .parts import ERROR, ROW, error_box, sample_label, zoom_region

HEAD = re.compile(r"^\s*l?\s*(\d+)\s*(?:h|-|\.|\s)\s*(\d+)\s*$", re.IGNORECASE)
COUNTS = ("n", "n_a", "n_b", "both")  # the comparison's columns that count heads
SEARCH_HINT = "type a head as L12H3, 12-3 or 12.3"
CARD_HINT = "Click a head in the grid, or find one above, to open its card."
SWATCH = {"display": "inline-block", "width": "12px", "height": "12px", "borderRadius": "2px", "marginRight": "6px",
          "verticalAlign": "middle"}
MAP = {"width": "640px", "height": "600px"}  # the attention map, once computed
HIDDEN = {"display": "none"}
CELL = {"padding": "2px 10px", "textAlign": "left", "borderBottom": "1px solid #eee", "fontSize": "13px"}


def parse_head(text: str) -> tuple[int, int]:
    """(layer, head) of a head as typed: `L12H3`, `12-3` or `12.3` (any case, spaces allowed); ValueError else."""
    match = HEAD.match(text or "")
    if not match:
        raise ValueError(f"{text!r} is not a head: {SEARCH_HINT}")
    return int(match[1]), int(match[2])


def load_atlas(board, atlas_id: str) -> Atlas:
    """The stored atlas `atlas_id` (an id or a unique prefix listed in the store), as `interp.atlases.open_atlas`
    rebuilds it but through the dashboard's catalog: every run it names must be a listed id (a recorded path is
    refused like an id from the browser) and is read once, then cached until it changes. ValueError for a run,
    CorruptRunError for an entry that cannot be read."""
    info = board.catalog.info(atlas_id)
    if info.status == "corrupt":
        raise CorruptRunError(f"{info.id} is corrupt: {info.error}")
    if not is_atlas(info.meta):
        raise ValueError(f"{info.id} is a run, not an atlas: see it at /run/{info.id}")
    atlas = Atlas(board.catalog.result(run) for run in info.meta["runs"].values())
    atlas.id, atlas.skipped = info.id, dict(info.meta.get("skipped", {}))
    atlas.preset = (info.meta.get("options") or {}).get("preset")
    return atlas


def atlas_options(board, but: str) -> list[dict]:
    """The store's other atlases as links' targets: {"id", "model"} for every complete atlas entry but `but`."""
    return [{"id": i.id, "model": i.meta["model"]["name"]} for i in board.catalog.listing()
            if i.status == "complete" and is_atlas(i.meta) and i.id != but]


def run_link(run_id: str, text: str | None = None):
    return dcc.Link(text or run_id, href=f"/run/{quote(run_id, safe='')}")


def atlas_layout(board, atlas_id: str, compare: str | None = None):
    """The atlas page: header (runs, skipped analyses, other atlases to compare with), the role grid beside the
    search box and the legend of roles, the head card and its attention, the overlap matrix, and the comparison with
    atlas `compare` when given."""
    atlas = load_atlas(board, atlas_id)
    colours = figures.role_colours(atlas.role_names)
    counts = atlas.roles[atlas.role_names].sum()
    legend = dcc.Checklist(
        id="atlas-roles", value=atlas.role_names, labelStyle={"display": "block", "margin": "3px 0"},
        options=[{"value": name, "label": html.Span([html.Span(style={**SWATCH, "background": colours[name]}),
                                                     f"{name} ({int(counts[name])} heads)"],
                                                    title=atlas.rules[name].description)}
                 for name in atlas.role_names])
    runs = [html.Li([f"{analysis}: ", run_link(run)]) for analysis, run in atlas.runs.items()]
    runs += [html.Li(f"{analysis}: skipped ({why})") for analysis, why in atlas.skipped.items()]
    others = atlas_options(board, atlas.id)
    header = html.Div([
        html.H2(f"Head atlas of {atlas.model}"),
        html.P(f"{len(atlas.heads)} heads · {len(atlas.scores)} scores · {len(atlas.rules)} roles · atlas {atlas.id}"
               + (f" · preset {atlas.preset}" if isinstance(atlas.preset, str) else "")
               + ". A head is written layer-head: 12-3 is layer 12, head 3."),
        html.Details([html.Summary(f"runs ({len(atlas.runs)})"), html.Ul(runs)]),
        *([html.P(["compare with: ", *[html.Span([dcc.Link(f"{o['id']} ({o['model']})",
                                                            href=f"/atlas/{quote(atlas.id, safe='')}"
                                                                 f"?compare={quote(o['id'], safe='')}"), " "])
                                        for o in others]], id="atlas-others")] if others else [])])
    controls = html.Div([
        html.Label("find a head "),
        dcc.Input(id="atlas-search", type="text", placeholder="L12H3, 12-3 or 12.3", debounce=True,
                  style={"width": "200px"}),
        html.Div(id="atlas-search-status", style={"margin": "4px 0 12px", "color": "#a61b1b"}),
        html.H4("roles (untick to hide)", style={"margin": "6px 0"}), legend,
        html.P("A head with several roles is split into one small square per role and outlined; grey: none of the "
               "roles shown. Hover a head for its roles.", style={"fontSize": "13px", "color": "#555"})],
        style={"width": "380px"})
    attention = html.Div([
        html.H4("attention on a sample"),
        html.Div([html.Label("run "),
                  dcc.Dropdown(id="atlas-attn-run", options=[{"label": f"{a} · {r}", "value": r}
                                                             for a, r in atlas.runs.items()],
                               value=next(iter(atlas.runs.values())), clearable=False, style={"width": "460px"}),
                  html.Label("sample "), dcc.Dropdown(id="atlas-attn-sample", clearable=False,
                                                      style={"width": "360px"})], style=ROW),
        html.Button(f"Compute attention (loads {atlas.model})", id="atlas-compute", n_clicks=0,
                    style={"margin": "8px 0"}),
        html.Div(id="atlas-attention-status", style={"margin": "6px 0"}),
        dcc.Loading(html.Div([dcc.Graph(id="atlas-attention", style=HIDDEN),
                              dcc.Graph(id="atlas-grid-view", style=HIDDEN)], style=ROW)),
        dcc.Store(id="atlas-region", data=None)])
    return html.Div([
        dcc.Store(id="atlas-id", data=atlas.id), dcc.Store(id="atlas-head", data=None), header,
        html.Div([dcc.Graph(id="atlas-grid", config={"displayModeBar": False}), controls], style=ROW),
        html.Div(html.P(CARD_HINT), id="atlas-card", style={"margin": "8px 0"}), attention,
        html.H3("Role overlaps"),
        dcc.Graph(id="atlas-overlaps", figure=figures.overlap_matrix(atlas), style={"height": "520px",
                                                                                 "maxWidth": "760px"}),
        *([compare_section(board, atlas, compare)] if compare else [])])


def choose_head(board, atlas_id: str, trigger: str | None, click: dict | None, text: str | None,
                current: list | None) -> tuple[list | None, str]:
    """(the chosen head [layer, head], a message for the search box): from a click on the grid or the text typed;
    a text that names no head of the atlas keeps the current head and says why."""
    if trigger == "atlas-grid" and click:
        point = click["points"][0]  # a role's square lies within its head's cell: ±0.5 around it
        return [round(point["y"]), round(point["x"])], ""
    if trigger == "atlas-search" and text and text.strip():
        try:
            layer, head = parse_head(text)
        except ValueError as e:
            return current, str(e)
        heads = load_atlas(board, atlas_id).heads
        if not ((heads["layer"] == layer) & (heads["head"] == head)).any():
            return current, f"no run in this atlas scored head {layer}-{head}"
        return [layer, head], ""
    return current, ""


def show_atlas(board, atlas_id: str, head: list | None, roles: list[str] | None):
    """(role grid, head card) for the chosen head (None: none yet) and the roles the legend shows."""
    atlas = load_atlas(board, atlas_id)
    selected = tuple(head) if head else None
    grid = figures.role_grid(atlas, roles=roles, selected=selected, legend=False)
    return grid, head_card(atlas, *selected) if selected else html.P(CARD_HINT)


def head_card(atlas: Atlas, layer: int, head: int):
    """One head's card: its roles (with their rules), and every score with rank, percentile and a link to its run."""
    card = atlas.card(layer, head)
    colours = figures.role_colours(atlas.role_names)
    roles = [html.Span([html.Span(style={**SWATCH, "background": colours[name]}), name],
                       title=atlas.rules[name].description, style={"marginRight": "14px"})
             for name in card["roles"]] or ["no role"]
    n = len(atlas.heads)
    rows = [html.Tr([html.Td(col, style=CELL), html.Td(_fmt(e["value"], ".4g"), style=CELL),
                     html.Td(f"{_fmt(e['rank'], '.0f')} / {n}", style=CELL),
                     html.Td(_fmt(e["percentile"], ".1f"), style=CELL),
                     html.Td(run_link(e["run"], col.split(".")[0]), style=CELL)])
            for col, e in card["scores"].items()]
    table = html.Table([html.Thead(html.Tr([html.Th(c, style=CELL) for c in ("score", "value", "rank",
                                                                               "percentile", "run")])),
                        html.Tbody(rows)], style={"borderCollapse": "collapse"})
    return html.Div([
        html.H3(f"head {layer}-{head} (KV head {card['kv_head']})"),
        html.P([html.B("roles: "), *roles]),
        html.P([html.B("runs: "), *[html.Span([run_link(r, a), " "]) for a, r in card["runs"].items()]]),
        table], style={"border": "1px solid #ddd", "borderRadius": "4px", "padding": "4px 14px",
                       "maxWidth": "900px"})


def sample_choices(board, run_id: str | None) -> tuple[list[dict], int | None]:
    """The planned samples of a run as dropdown options, and the first one."""
    if not run_id:
        return [], None
    plan = board.catalog.result(run_id).meta.get("plan", [])
    return [{"label": sample_label(i, entry), "value": i} for i, entry in enumerate(plan)], 0 if plan else None


def compare_section(board, atlas: Atlas, other_id: str):
    """The roles of `atlas` (A) and atlas `other_id` (B) side by side (`compare_atlases`): heads matched by layer and
    head where both score the same heads, else by relative depth; a message when B cannot be opened."""
    try:
        other = load_atlas(board, other_id)
        table = compare_atlases(atlas, other)
    except Exception as e:  # noqa: BLE001  (a bad second atlas leaves the first one's page in place)
        return html.Div([html.H3("Compared with another atlas"), error_box(str(e))], id="atlas-compare")
    table = table.dropna(axis=1, how="all")
    columns = [{"name": c, "id": c, **({"type": "numeric", "format": Format(precision=0 if c in COUNTS else 3,
                                                                             scheme=Scheme.fixed if c in COUNTS
                                                                             else Scheme.decimal_or_exponent)}
                                        if pd.api.types.is_numeric_dtype(table[c]) else {})} for c in table.columns]
    matched = table[table["match"] == "layer-head"]
    held = matched[(matched["n_a"] + matched["n_b"]) > 0]["role"]  # the first role either atlas gives a head
    role = held.iloc[0] if len(held) else matched["role"].iloc[0] if len(matched) else None
    changes = [html.Div([html.Label("role, head by head "),
                         dcc.Dropdown(id="atlas-compare-role", options=list(matched["role"]), value=role,
                                      clearable=False, style={"width": "360px"})], style={**ROW, "marginTop": "14px"}),
               dcc.Graph(id="atlas-changes", figure=figures.role_changes(atlas, other, role),
                         style={"width": "640px", "height": "460px"})] if role else []
    return html.Div([
        dcc.Store(id="atlas-compare-id", data=other.id),
        html.H3(f"Compared with atlas {other.id} ({other.model})"),
        html.P("A: this atlas, B: the other. Matched by layer and head: Jaccard of each role's heads, its chance value "
               "and p-value, the heads only A or only B has; else by relative depth."),
        dash_table.DataTable(id="atlas-compare-table", data=table.astype(object).where(table.notna(), None)
                             .to_dict("records"), columns=columns, sort_action="native",
                             style_cell={"textAlign": "left", "fontSize": "13px", "whiteSpace": "normal",
                                         "maxWidth": "360px"}),
        *changes], id="atlas-compare")


def show_attention(board, trigger: str | None, run_id: str, head: list | None, sample: int | None,
                   relayout: dict | None, region: dict | None):
    """(attention map, its style, grid view, its style, status, region): computed by the run page's
    `Dashboard.show_attention` on the button (the whole input) or on a zoom box over a computed map; another head,
    run or sample hides the map until asked again."""
    if trigger == "atlas-attention":
        new = zoom_region(relayout, region)
        if region is None or new == region:
            raise dash.exceptions.PreventUpdate  # a relayout of the hidden map, or one that is no zoom
    elif trigger == "atlas-compute" and head and sample is not None:
        new = None  # the whole input
    else:
        status = (f"press Compute attention for head {head[0]}-{head[1]}'s attention on the sample" if head else
                  "choose a head first: its attention on a sample of one of the runs is computed here on request")
        return figures.placeholder_figure(""), HIDDEN, figures.placeholder_figure(""), HIDDEN, status, None
    fig, grid, grid_style, status, region = board.show_attention(run_id, head[0], head[1], sample, region=new)
    return fig, MAP, grid, grid_style, status, region


def register_atlas_callbacks(app: dash.Dash, board) -> None:
    """The atlas page's callbacks on `app` (whose page callback routes /atlas/<id> to `atlas_layout`)."""

    @app.callback(Output("atlas-head", "data"), Output("atlas-search-status", "children"),
                  Input("atlas-grid", "clickData"), Input("atlas-search", "value"), State("atlas-id", "data"),
                  State("atlas-head", "data"), prevent_initial_call=True)
    def _choose(click, text, atlas_id, current):
        return choose_head(board, atlas_id, ctx.triggered_id, click, text, current)

    @app.callback(Output("atlas-grid", "figure"), Output("atlas-card", "children"), Input("atlas-head", "data"),
                  Input("atlas-roles", "value"), State("atlas-id", "data"))
    def _show(head, roles, atlas_id):
        try:
            return show_atlas(board, atlas_id, head, roles)
        except Exception as e:  # noqa: BLE001
            return figures.placeholder_figure(str(e), error=True), error_box(str(e))

    @app.callback(Output("atlas-changes", "figure"), Input("atlas-compare-role", "value"), State("atlas-id", "data"),
                  State("atlas-compare-id", "data"), prevent_initial_call=True)
    def _changes(role, atlas_id, other_id):
        try:
            return figures.role_changes(load_atlas(board, atlas_id), load_atlas(board, other_id), role)
        except Exception as e:  # noqa: BLE001
            return figures.placeholder_figure(str(e), error=True)

    @app.callback(Output("atlas-attn-sample", "options"), Output("atlas-attn-sample", "value"),
                  Input("atlas-attn-run", "value"))
    def _samples(run_id):
        try:
            return sample_choices(board, run_id)
        except Exception:  # noqa: BLE001  (an unreadable run offers no sample; Compute says why)
            return [], None

    @app.callback(Output("atlas-attention", "figure"), Output("atlas-attention", "style"),
                  Output("atlas-grid-view", "figure"), Output("atlas-grid-view", "style"),
                  Output("atlas-attention-status", "children"),
                  Output("atlas-region", "data"), Input("atlas-compute", "n_clicks"), Input("atlas-head", "data"),
                  Input("atlas-attn-run", "value"), Input("atlas-attn-sample", "value"),
                  Input("atlas-attention", "relayoutData"), State("atlas-region", "data"), prevent_initial_call=True)
    def _attention(_, head, run_id, sample, relayout, region):
        try:
            return show_attention(board, ctx.triggered_id, run_id, head, sample, relayout, region)
        except dash.exceptions.PreventUpdate:
            raise
        except Exception as e:  # noqa: BLE001
            return (figures.placeholder_figure(""), HIDDEN, figures.placeholder_figure(""), HIDDEN,
                    html.Span(str(e), style=ERROR), region)


def _fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
