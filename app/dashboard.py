"""The Dash dashboard: `interp app`. Pages: the runs of a store (/), one run (/run/<id>: head map, ranked heads,
head detail, the analysis's own view; <id> or a unique prefix of it), two runs compared (/compare?a=<id>&b=<id>), and
a head atlas (/atlas/<id>: `atlas_page`). A run's tables download as CSV (/table/<id>/<name>.csv), every figure as PNG
or SVG from its mode bar (assets/download.js).

It reads the store only; a model is loaded only when the user asks for an attention view (AttentionSource).
Callbacks are plain functions of their inputs (tested without a browser); every failure becomes a message on
the page, never a dead app.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from urllib.parse import parse_qs, quote, unquote

import dash
import flask
import plotly.graph_objects as go
from dash import Input, Output, State, ctx, dash_table, dcc, html

from interp.compare import rank_correlation, top_overlap
from interp.files import confined
from interp.results import ScoreResult
from interp.store import Store, is_atlas

from . import figures
from . import views
from .atlas_page import atlas_layout, register_atlas_callbacks
from .attention import AttentionSource, Prompt, default_query, head_statistics, token_spans
from .data import RunCatalog
from .parts import ERROR, ROW, error_box, sample_label, zoom_region

TOP_K = 20
REFRESH_MS = 10_000  # the runs page re-reads the store this often (runs in progress move on)
PAGE = {"fontFamily": "system-ui, sans-serif", "margin": "0 auto", "maxWidth": "1400px", "padding": "0 16px"}
ATTENTION_PLACEHOLDER = views.ATTENTION_PLACEHOLDER
GRID = {"display": "grid", "gridTemplateColumns": "repeat(auto-fill, minmax(560px, 1fr))", "gap": "12px"}


class Dashboard:
    """The app's state (catalog of runs, attention source) and its callbacks as plain methods."""

    def __init__(self, store: Store | str | os.PathLike | None = None, attention: AttentionSource | None = None):
        self.catalog = RunCatalog(store)
        self.attention = attention or AttentionSource()

    # ---- pages

    def page(self, pathname: str | None, search: str | None = None):
        """The page for a URL path."""
        path = (pathname or "/").rstrip("/") or "/"
        query = {k: v[0] for k, v in parse_qs((search or "").lstrip("?")).items()}
        try:
            if path == "/":
                return self.runs_page()
            if path.startswith("/run/"):
                return self.run_page(unquote(path.removeprefix("/run/")))
            if path == "/compare":
                return self.compare_page(query.get("a"), query.get("b"), query.get("sa"), query.get("sb"),
                                         int(query["k"]) if query.get("k", "").isdigit() else 10, query.get("abs") == "1")
            if path.startswith("/atlas/"):
                return atlas_layout(self, unquote(path.removeprefix("/atlas/")), query.get("compare"))
            return error_box(f"no page {path!r}: see the runs at /")
        except Exception as e:  # noqa: BLE001  (a broken run shows as a message)
            return error_box(str(e))

    def runs_rows(self) -> list[dict]:
        """The runs table's rows. Every cell is plain text but "open", a markdown link whose text is fixed and whose
        address is the run id percent-encoded: a run's words (a directory name, a model name) never become markdown."""
        rows = []
        for info in self.catalog.listing():
            m = info.meta or {}
            done, total = info.progress
            page = "atlas" if is_atlas(m) else "run"  # an atlas entry opens its own page
            rows.append({"open": f"[open](/{page}/{quote(info.id, safe='')})", "id": info.id, "status": info.status,
                         "analysis": m.get("analysis", ""),
                         "model": (m.get("model") or {}).get("name", ""), "samples": f"{done}/{total}",
                         "started": info.started[:19].replace("T", " "),
                         "parameters": _short_json({**(m.get("options") or {}), **(m.get("params") or {})}),
                         "error": info.error or ""})
        return rows

    def runs_page(self):
        rows = self.runs_rows()
        columns = [{"name": "", "id": "open", "presentation": "markdown"},
                   *({"name": c, "id": c} for c in ("id", "status", "analysis", "model", "samples", "started",
                                                    "parameters", "error"))]
        table = dash_table.DataTable(
            id="runs-table", data=rows, columns=columns, filter_action="native", sort_action="native",
            page_size=25, export_format="csv", markdown_options={"link_target": "_self"},
            style_cell={"textAlign": "left", "maxWidth": "420px", "whiteSpace": "normal", "fontSize": "13px"},
            style_data_conditional=[
                {"if": {"filter_query": '{status} = "corrupt"'}, "backgroundColor": "#fdecea"},
                {"if": {"filter_query": '{status} = "incomplete"'}, "backgroundColor": "#fff6db"},
                {"if": {"filter_query": '{status} = "running"'}, "backgroundColor": "#e8f1fb"}])
        intro = html.P(f"{len(rows)} runs in {self.catalog.store.root}. Filter and sort in the header; open a run from "
                       "its row; compare two runs on the Compare page.")
        return html.Div([html.H2("Runs"), intro, table, dcc.Interval(id="runs-refresh", interval=REFRESH_MS)])

    def run_page(self, run_id: str):
        run_id = self.catalog.info(run_id).id  # a unique prefix of it, as the CLI takes it
        result = self.catalog.result(run_id)
        m = result.meta
        done, total, unit = result.counted()
        status = m.get("status", "complete")
        header = html.Div([
            html.H2(f"{m['analysis']} on {m['model']['name']}"),
            html.P([html.B(status), f" · {done}/{total} {unit} · started {m.get('started', '')[:19]} · run {run_id}",
                    *([html.Span(f" · {m['error']}", style={"color": "#a61b1b"})] if m.get("error") else [])]),
            html.P(["tables as CSV: ", *_table_links(result)], id="table-links"),
            html.Details([html.Summary("options and parameters"),
                          html.Pre(json.dumps({"options": m["options"], "params": m["params"]}, indent=1))])])
        if result.heads.empty:
            return html.Div([header, error_box("this run has no finished sample yet: nothing to show")])
        scores = result.scores
        best = result.top(scores[0], k=1)
        layer, head = (int(best["layer"].iloc[0]), int(best["head"].iloc[0])) if len(best) else (0, 0)
        samples = sorted(int(s) for s in result.samples["sample"].unique())
        plan = m.get("plan", [])
        heads_tab = html.Div([
            html.Div([html.Label("score "), dcc.Dropdown(id="score", options=scores, value=scores[0], clearable=False,
                                                          style={"width": "320px"})], style=ROW),
            html.Div([
                dcc.Graph(id="head-map", style={"width": "640px", "height": "560px"}),
                html.Div([html.H4("ranked heads (click a row)"),
                          dash_table.DataTable(id="ranked", page_size=TOP_K, style_cell={"fontSize": "13px"},
                                               export_format="csv")],
                         style={"width": "420px"})], style=ROW),
            html.H3(id="detail-title"),
            html.Div([
                html.Label("layer "), dcc.Dropdown(id="layer", options=list(range(m["model"]["n_layers"])),
                                                   value=layer, clearable=False, style={"width": "90px"}),
                html.Label("head "), dcc.Dropdown(id="head", options=list(range(m["model"]["n_heads"])), value=head,
                                                  clearable=False, style={"width": "90px"}),
                html.Label("sample "), dcc.Dropdown(id="sample", options=[{"label": sample_label(i, plan[i]),
                                                                           "value": i} for i in samples],
                                                    value=samples[0], clearable=False, style={"width": "420px"})],
                style=ROW),
            html.Div([
                dcc.Graph(id="sample-scores", style={"width": "560px", "height": "420px"}),
                views.attention_panel(m["model"]["name"])], style=ROW)])
        tabs = dcc.Tabs([dcc.Tab(heads_tab, label="Heads", value="heads"),
                         dcc.Tab(html.Div(self.analysis_view(result), id="analysis-view", style=GRID),
                                 label=f"{m['analysis']} view", value="analysis")], value="heads")
        return html.Div([dcc.Store(id="run-id", data=run_id), header, tabs])

    # ---- head map, ranked heads, head detail

    def ranked(self, run_id: str, score: str) -> tuple[list[dict], list[dict]]:
        """(rows, columns) of the ranked-heads table."""
        top = self.catalog.result(run_id).top(score, k=TOP_K)
        top.insert(0, "rank", range(1, len(top) + 1))
        top[score] = top[score].astype(float).round(4)
        return top.to_dict("records"), [{"name": c, "id": c} for c in top.columns]

    def choose_head(self, trigger: str | None, click: dict | None, cell: dict | None, rows: list[dict] | None,
                    layer: int, head: int) -> tuple[int, int]:
        """The head chosen by a click on the head map or on a ranked row (else the current one)."""
        if trigger == "head-map" and click:
            point = click["points"][0]
            return int(point["y"]), int(point["x"])
        if trigger == "ranked" and cell and rows and cell["row"] < len(rows):
            row = rows[cell["row"]]
            return int(row["layer"]), int(row["head"])
        return layer, head

    def show_head(self, run_id: str, score: str, layer: int, head: int, sample: int):
        """(head map, per-sample scores, detail title) for the chosen head and sample: what answers a head choice."""
        result = self.catalog.result(run_id)
        hmap = figures.head_map(result.heads, score, title=f"{score} — {result.meta['model']['name']}",
                                selected=(layer, head))
        try:
            bars = figures.sample_scores(result.samples, layer, head, result.sample_column(score), selected=sample,
                                         describe=result.describe)
        except ValueError as e:
            bars = figures.placeholder_figure(str(e), error=True)
        row = result.heads[(result.heads["layer"] == layer) & (result.heads["head"] == head)]
        value = f"{row[score].iloc[0]:.4g}" if len(row) else "not scored"
        kv = int(row["kv_head"].iloc[0]) if len(row) else "?"
        return hmap, bars, f"head {layer}-{head} (KV head {kv}): {score} = {value}"

    def choose_sample(self, click: dict | None, sample: int) -> int:
        return int(click["points"][0]["x"]) if click else sample

    def show_attention(self, run_id: str, layer: int, head: int, sample: int, query: int | None = None,
                       region: dict | None = None, *, key: int | None = None, scale: str = "linear",
                       prompt: Prompt | None = None):
        """(attention map, grid view, grid style, status, region) for the chosen head on the sample, or on a live
        `prompt` through the run's model, over a token region ({"q": [q0, q1], "k": [k0, k1]}; None: the whole
        input). query (None or < 0: `default_query`) and key: the selection outlined on the map; the query's row is
        also laid over the image. scale: the colour axis (`figures.scaled`). The status gives the head's statistics
        on the input (`head_statistics`)."""
        meta = self.catalog.replay_meta(run_id, sample)
        q_range, k_range = (region["q"], region["k"]) if region else (None, None)
        view = self.attention.pattern(meta, sample, layer, head, q_range, k_range, prompt=prompt)
        cap = self.attention.layer(meta, sample, layer, prompt)
        q = default_query(cap) if query is None or query < 0 else int(query)
        stats = head_statistics(cap, head)
        spans = token_spans(cap, None if prompt else views.sample_spans(self.catalog.result(run_id), sample),
                            stats["sinks"])
        fig = figures.attention_map(view.matrix, view.q_range, view.k_range, block=view.block, q_tokens=view.q_tokens,
                                    k_tokens=view.k_tokens, spans=spans, scale=scale, selected=(q, key),
                                    title=f"head {layer}-{head}, {'your prompt' if prompt else f'sample {sample}'}")
        status = (f"{cap.n_tokens} tokens · " + ("exact per token" if view.exact else
                  f"{view.matrix.shape[0]}×{view.matrix.shape[1]} pooled blocks: drag a box to zoom in, "
                  "double-click to zoom out") + " · " + views.describe_statistics(stats))
        grid_fig, grid_style = go.Figure(), {"display": "none"}
        if cap.layout.grids:
            try:  # a bad query token leaves the map in place
                values, image = self.attention.query_on_grid(meta, sample, layer, head, q, prompt=prompt)
                grid_fig = figures.grid_overlay(values, image, title=f"query {q} ({cap.tokens[q]!r}) on the image",
                                                label="attention")
                grid_style = {"width": "520px", "height": "480px"}
            except ValueError as e:
                status += f" · image view: {e}"
        return fig, grid_fig, grid_style, status, {"q": list(view.q_range), "k": list(view.k_range)}

    # ---- the analysis's own view

    def analysis_view(self, result: ScoreResult) -> list:
        """The analysis's own view of the run (`ScoreResult.view`: its figures and notes), in the tab's grid."""
        try:
            items = result.view()
        except Exception as e:  # noqa: BLE001  (one bad table does not hide the rest of the run)
            return [_full_width(html.Div(f"this view cannot be drawn: {e}", style=ERROR))]
        return [dcc.Graph(figure=item, style={"height": "440px"}) if isinstance(item, go.Figure) else
                _full_width(html.P([item.text, *([html.A(item.link[0], href=item.link[1])] if item.link else [])]))
                for item in items]

    # ---- compare

    def run_options(self) -> list[dict]:
        return [{"label": f"{i.id} · {i.meta['analysis']} · {i.meta['model']['name']}", "value": i.id}
                for i in self.catalog.listing() if i.status != "corrupt" and i.meta]

    def compare_page(self, a: str | None, b: str | None, score_a: str | None = None, score_b: str | None = None,
                     k: int = 10, magnitude: bool = False):
        """Two runs (or one run twice, e.g. two tasks' circuits) and a score of each; `magnitude` ranks by |score|."""
        options = self.run_options()
        ids = [o["value"] for o in options]
        a = a if a in ids else (ids[0] if ids else None)
        b = b if b in ids else (ids[1] if len(ids) > 1 else a)
        pick = lambda i, v: dcc.Dropdown(id=f"run-{i}", options=options, value=v, clearable=False)  # noqa: E731
        score = lambda i, v: dcc.Dropdown(id=f"score-{i}", value=v, clearable=False)  # noqa: E731
        return html.Div([
            html.H2("Compare two runs"),
            html.Div([html.Div([html.Label("run A"), pick("a", a), score("a", score_a)], style={"width": "600px"}),
                      html.Div([html.Label("run B"), pick("b", b), score("b", score_b)], style={"width": "600px"})],
                     style=ROW),
            html.Div([html.Label("top k heads "), dcc.Input(id="top-k", type="number", value=k, min=1, debounce=True,
                                                            style={"width": "90px"}),
                      dcc.Checklist(id="by-magnitude", options=[{"label": " rank by |score| (signed effects)",
                                                                 "value": "abs"}],
                                    value=["abs"] if magnitude else [])], style=ROW),
            html.Div(id="overlap", style={"margin": "8px 0"}),
            html.Div([dcc.Graph(id="scatter", style={"width": "480px", "height": "460px"}),
                      dcc.Graph(id="map-a", style={"width": "430px", "height": "460px"}),
                      dcc.Graph(id="map-b", style={"width": "430px", "height": "460px"})], style=ROW)])

    def score_choices(self, run_id: str | None, current: str | None = None) -> tuple[list[str], str | None]:
        """A run's scores, and the one to show: `current` when the run has it, else the first."""
        if not run_id:
            return [], None
        scores = self.catalog.result(run_id).scores
        return scores, current if current in scores else scores[0]

    def compare(self, a: str, score_a: str, b: str, score_b: str, k: int, magnitude: bool = False):
        """(overlap summary, scatter, map A, map B) of two runs' scores; `magnitude`: top heads and ρ by |score|."""
        ra, rb = self.catalog.result(a), self.catalog.result(b)
        k = max(1, int(k or 10))
        rank_a, rank_b = ra.heads, rb.heads
        if magnitude:
            rank_a = ra.heads.assign(**{score_a: ra.heads[score_a].abs()})
            rank_b = rb.heads.assign(**{score_b: rb.heads[score_b].abs()})
        ov = top_overlap(rank_a, score_a, rank_b, score_b, k)
        rho = rank_correlation(rank_a, score_a, rank_b, score_b)
        fmt = lambda hs: ", ".join(f"{l}-{h}" for l, h in hs) or "none"  # noqa: E731
        summary = html.Div([
            html.P(f"top {k}{' by |score|' if magnitude else ''}: {len(ov.shared)} heads shared · Jaccard "
                   f"{ov.jaccard:.3f} · overlap of the smaller {ov.of_smaller:.3f} · Spearman ρ of all "
                   f"{'|scores|' if magnitude else 'scores'} {rho:.3f}"),
            html.P(f"shared: {fmt(ov.shared)}"), html.P(f"only A: {fmt(ov.only_a)}"),
            html.P(f"only B: {fmt(ov.only_b)}")], id="overlap-summary")
        scatter = figures.compare_scatter(ra.heads, score_a, rb.heads, score_b, name_a="A", name_b="B", highlight=ov)
        return (summary, scatter, figures.head_map(ra.heads, score_a, title=f"A: {score_a} — {ra.meta['model']['name']}"),
                figures.head_map(rb.heads, score_b, title=f"B: {score_b} — {rb.meta['model']['name']}"))


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def make_app(store: Store | str | os.PathLike | None = None, attention: AttentionSource | None = None,
             hosts: Iterable[str] = LOCAL_HOSTS) -> dash.Dash:
    """The Dash app over a store (default: the default store). hosts: the names a request's `Host` header may
    give (port aside; "*" for any): others get 403, so a page elsewhere cannot reach the app through a DNS
    name rebound to this machine."""
    board = Dashboard(store, attention)
    app = dash.Dash(__name__, title="interp", suppress_callback_exceptions=True)
    allowed = {h.strip("[]").lower() for h in hosts}

    @app.server.before_request
    def _check_host():
        host = flask.request.host.lower()
        name = host[1:host.index("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if ":" in host else host
        if "*" not in allowed and name not in allowed:
            return flask.Response(f"host {name!r} is not served here; start the app with --allow-host {name} to allow it",
                                  status=403, mimetype="text/plain")
        flask.g.confinement = confined(board.catalog.store.root)  # a run's recorded paths: read only in the store
        flask.g.confinement.__enter__()
        return None

    @app.server.route("/table/<run_id>/<name>.csv")
    def _table_csv(run_id: str, name: str):
        """A run's table (`ScoreResult.table_names`) as CSV, the run found as the pages find it."""
        try:
            result = board.catalog.result(run_id)
            table = result.table(name)
        except ValueError as e:  # no such run or table, or a corrupt run
            return flask.Response(str(e), status=404, mimetype="text/plain")
        filename = quote(f"{result.path.name}-{name}.csv", safe="")
        return flask.Response(table.to_csv(index=False), mimetype="text/csv",
                              headers={"Content-Disposition": f"attachment; filename*=UTF-8''{filename}"})

    @app.server.teardown_request
    def _release(_error):
        if "confinement" in flask.g:
            flask.g.confinement.__exit__(None, None, None)

    app.layout = html.Div([
        dcc.Location(id="url"),
        html.Div([html.B("interp"), dcc.Link("Runs", href="/"), dcc.Link("Compare", href="/compare")],
                 style={"display": "flex", "gap": "20px", "padding": "10px 0", "borderBottom": "1px solid #ddd"}),
        html.Div(id="page")], style=PAGE)
    app.board = board
    register_atlas_callbacks(app, board)

    app.callback(Output("page", "children"), Input("url", "pathname"), Input("url", "search"))(board.page)

    @app.callback(Output("runs-table", "data"), Input("runs-refresh", "n_intervals"), prevent_initial_call=True)
    def _refresh(_):
        try:
            return board.runs_rows()
        except OSError:  # the store went away meanwhile: keep the table
            raise dash.exceptions.PreventUpdate

    @app.callback(Output("ranked", "data"), Output("ranked", "columns"), Input("score", "value"), State("run-id", "data"))
    def _ranked(score, run_id):
        try:
            return board.ranked(run_id, score)
        except Exception:  # noqa: BLE001  (the page's own message says what is wrong with the run)
            return [], []

    @app.callback(Output("layer", "value"), Output("head", "value"), Input("head-map", "clickData"),
                  Input("ranked", "active_cell"), State("ranked", "data"), State("layer", "value"),
                  State("head", "value"), prevent_initial_call=True)
    def _choose(click, cell, rows, layer, head):
        return board.choose_head(ctx.triggered_id, click, cell, rows, layer, head)

    @app.callback(Output("head-map", "figure"), Output("sample-scores", "figure"), Output("detail-title", "children"),
                  Input("score", "value"), Input("layer", "value"), Input("head", "value"), Input("sample", "value"),
                  State("run-id", "data"))
    def _head(score, layer, head, sample, run_id):
        try:
            return board.show_head(run_id, score, layer, head, sample)
        except Exception as e:  # noqa: BLE001
            failed = figures.placeholder_figure(str(e), error=True)
            return failed, failed, str(e)

    @app.callback(Output("sample", "value"), Input("sample-scores", "clickData"), State("sample", "value"),
                  prevent_initial_call=True)
    def _sample(click, sample):
        return board.choose_sample(click, sample)

    views.register(app, board)

    @app.callback(Output("live", "data"), Input("compute", "n_clicks"), prevent_initial_call=True)
    def _live(n):
        return bool(n)

    @app.callback(Output("attention", "figure"), Output("grid-view", "figure"), Output("grid-view", "style"),
                  Output("attention-status", "children"), Output("region", "data"),
                  Input("live", "data"), Input("layer", "value"), Input("head", "value"), Input("sample", "value"),
                  Input("query", "value"), Input("attention", "relayoutData"), Input("key", "data"),
                  Input("scale", "value"), Input("prompt", "data"), State("region", "data"), State("run-id", "data"),
                  prevent_initial_call=True, running=views.LOADING)
    def _attention(live, layer, head, sample, query, relayout, key, scale, prompt, region, run_id):
        if not live:
            raise dash.exceptions.PreventUpdate
        new = region if ctx.triggered_id in ("query", "key", "scale") else None  # else the whole (new) input
        if ctx.triggered_id == "attention":
            new = zoom_region(relayout, region)
            if new == region:
                raise dash.exceptions.PreventUpdate  # a relayout that is no zoom (autosize, a drag of the colour bar)
        try:
            return board.show_attention(run_id, layer, head, sample, query, new, key=key, scale=scale,
                                        prompt=views.prompt_of(prompt))
        except Exception as e:  # noqa: BLE001
            return (figures.placeholder_figure(str(e), error=True), figures.placeholder_figure(""), {"display": "none"},
                    html.Span(str(e), style=ERROR), region)

    @app.callback(Output("score-a", "options"), Output("score-a", "value"), Input("run-a", "value"),
                  State("score-a", "value"))
    def _scores_a(run_id, current):
        return _choices(board, run_id, current)

    @app.callback(Output("score-b", "options"), Output("score-b", "value"), Input("run-b", "value"),
                  State("score-b", "value"))
    def _scores_b(run_id, current):
        return _choices(board, run_id, current)

    @app.callback(Output("overlap", "children"), Output("scatter", "figure"), Output("map-a", "figure"),
                  Output("map-b", "figure"), Input("run-a", "value"), Input("score-a", "value"),
                  Input("run-b", "value"), Input("score-b", "value"), Input("top-k", "value"),
                  Input("by-magnitude", "value"))
    def _compare(a, score_a, b, score_b, k, magnitude):
        if not (a and b and score_a and score_b):
            raise dash.exceptions.PreventUpdate
        try:
            return board.compare(a, score_a, b, score_b, k, "abs" in (magnitude or []))
        except Exception as e:  # noqa: BLE001
            empty = figures.placeholder_figure("")
            return html.Div(str(e), style=ERROR), figures.placeholder_figure(str(e), error=True), empty, empty

    return app


def _choices(board: Dashboard, run_id: str | None, current: str | None = None) -> tuple[list[str], str | None]:
    try:
        return board.score_choices(run_id, current)
    except Exception:  # noqa: BLE001  (an unreadable run offers no score; the overlap says why)
        return [], None


def _full_width(component):
    """A text or link of a view, across every column of the view's grid of figures."""
    component.style = {**(getattr(component, "style", None) or {}), "gridColumn": "1 / -1"}
    return component


def _table_links(result: ScoreResult) -> list:
    """A link per table of a run to its CSV (`/table/<run>/<name>.csv`), separated by " · "."""
    links = [html.A(name, href=f"/table/{quote(result.path.name, safe='')}/{quote(name, safe='')}.csv", download="")
             for name in result.table_names]
    return [part for i, link in enumerate(links) for part in ([" · "] if i else []) + [link]]


def _short_json(d: dict, limit: int = 160) -> str:
    text = json.dumps({k: v for k, v in d.items() if v is not None}, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


