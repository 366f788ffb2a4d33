"""The head atlas (issue 30): roles declared by the analyses, one table of every score, cards, role overlaps against
chance, score correlations and layer profiles — checked against the stored runs and hand computations."""

import io
import itertools
import json
import random

import numpy as np
import pandas as pd
import pytest

import interp
import planted
from interp.analyses import ANALYSES, get_analysis
from interp.analyses.base import Role
from interp.analyses.circuits import circuit_heads
from interp.atlases import Atlas

# Each declared role, written out by hand: (analysis, score) -> the rule.
HAND = {
    "retrieval.retrieval": ("retrieval_score", lambda s: s > 0.1),
    "taxonomy.induction": ("induction", lambda s: s > 0.2),
    "taxonomy.previous_token": ("previous_token", lambda s: s > 0.5),
    "taxonomy.duplicate_token": ("duplicate_token", lambda s: s > 0.2),
    "lookback.lookback": ("lookback_rate", lambda s: s > 50),
    "sinks.sink": ("sink_rate", lambda s: s > 50),
    **{f"taxonomy.pattern_{p}": ("pattern", lambda s, p=p: s == p)
       for p in ("a_shape", "block_sparse", "vertical_slash", "dense")},
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Stored runs of the planted retrieval model (retrieval, taxonomy, lookback, sinks) and of stories260k (summary,
    taxonomy, lookback, sinks): (store, {model: [run ids]})."""
    root = tmp_path_factory.mktemp("atlas")
    rng = random.Random(0)
    (root / "hay.txt").write_text(" ".join(" ".join(rng.choice(planted.FILLER) for _ in range(rng.randint(4, 8)))
                                           + " ." for _ in range(300)))
    (root / "needles.jsonl").write_text(json.dumps({"needle": "the secret code is alpha bravo charlie delta .",
                                                    "question": "the secret code is",
                                                    "answer": "alpha bravo charlie delta"}) + "\n")
    store = root / "store"
    model = planted.model()
    runs = {"planted": [
        interp.score(model, "retrieval", lengths=[120], depths=[50], mask_k=[0], max_new_tokens=8,
                     haystack=str(root / "hay.txt"), needles=str(root / "needles.jsonl"),
                     template="{context} {question}", store=store).id,
        *(interp.score(model, a, samples=2, store=store).id for a in ("taxonomy", "lookback", "sinks"))]}
    stories = interp.load_model("stories260k")
    runs["stories"] = [interp.score(stories, a, samples=2, store=store).id
                       for a in ("summary", "taxonomy", "lookback", "sinks")]
    return store, runs


@pytest.fixture(scope="module")
def atlases(stored):
    store, runs = stored
    return {name: Atlas.open(ids, store) for name, ids in runs.items()}


def _heads(mask: pd.Series, table: pd.DataFrame) -> set:
    return set(zip(table.loc[mask.to_numpy(), "layer"], table.loc[mask.to_numpy(), "head"]))


def test_every_card_holds_the_runs_scores_ranks_and_roles(stored, atlases):
    store, runs = stored
    for name, atlas in atlases.items():
        results = [interp.open_run(r, store) for r in runs[name]]
        assert atlas.runs == {r.analysis: r.id for r in results}
        n = len(results[0].heads)
        assert len(atlas.heads) == n and all(len(r.heads) == n for r in results)
        for r in results:
            for score in r.scores:
                col = f"{r.analysis}.{score}"
                assert col in atlas.scores
                values = r.heads.set_index(["layer", "head"])[score].astype(float)
                for (layer, head), value in values.items():
                    card = atlas.card(layer, head)
                    entry = card["scores"][col]
                    assert entry["run"] == r.id and card["runs"] == atlas.runs
                    assert entry["value"] == pytest.approx(value, nan_ok=True)
                    # rank: 1 + heads strictly higher; percentile: share of heads at or below
                    assert entry["rank"] == 1 + int((values > value).sum())
                    assert entry["percentile"] == pytest.approx(100 * (values <= value).mean())
        for layer, head in zip(atlas.heads["layer"], atlas.heads["head"]):
            card = atlas.card(layer, head)
            hand = [role for role, (score, rule) in HAND.items() if role.split(".")[0] in atlas.runs
                    and rule(atlas.heads.set_index(["layer", "head"]).loc[(layer, head), f"{role.split('.')[0]}.{score}"])]
            assert sorted(card["roles"]) == sorted(hand)
    with pytest.raises(KeyError, match="no run"):
        atlases["planted"].card(7, 0)


def test_roles_are_each_rule_applied_by_hand(stored, atlases):
    store, runs = stored
    for name, atlas in atlases.items():
        analyses = {interp.open_run(r, store).analysis: interp.open_run(r, store) for r in runs[name]}
        expected = {role for role in HAND if role.split(".")[0] in analyses}
        assert set(atlas.role_names) == expected  # summary declares none; sinks' image role needs an image
        for role in expected:
            analysis, _ = role.split(".")
            score, rule = HAND[role]
            heads = analyses[analysis].heads
            assert _heads(atlas.roles[role], atlas.roles) == _heads(rule(heads[score]), heads), role
    assert atlases["planted"].rules["retrieval.retrieval"].threshold == 0.1  # read from the run's parameters


def test_the_planted_heads_get_their_roles_and_no_other_head_does(atlases):
    atlas = atlases["planted"]
    roles = atlas.roles
    assert _heads(roles["retrieval.retrieval"], roles) == set(planted.COPY_HEADS)
    assert _heads(roles["taxonomy.induction"], roles) == set(planted.COPY_HEADS)
    assert _heads(roles["taxonomy.previous_token"], roles) == {(0, 0)}
    assert _heads(roles["lookback.lookback"], roles) == {(0, 0)}
    assert not roles["sinks.sink"].any()
    card = atlas.card(1, 1)
    assert [r for r in card["roles"] if ".pattern_" not in r] == ["retrieval.retrieval", "taxonomy.induction"]
    assert [r for r in card["roles"] if ".pattern_" in r] == [f"taxonomy.pattern_{card['labels']['taxonomy.pattern']}"]
    classes = [r for r in atlas.role_names if ".pattern_" in r]
    assert (roles[classes].sum(axis=1) == 1).all()  # every head of a causal model has exactly one pattern class
    profiles = atlas.layer_profiles()
    assert profiles.loc[1, "retrieval.retrieval"] == 0.5 and profiles.loc[0, "retrieval.retrieval"] == 0
    assert profiles.loc[0, "lookback.lookback"] == 0.25
    ov = atlas.overlaps().set_index(["role_a", "role_b"])
    row = ov.loc[("retrieval.retrieval", "taxonomy.induction")]
    assert row["jaccard"] == 1 and row["p_exact"] == pytest.approx(1 / 28)  # 2 of 8 heads: one pair in C(8, 2)


def _hand_overlap(a: np.ndarray, b: np.ndarray, n_permutations: int, seed: int) -> tuple:
    """Jaccard, its mean under independence, the permutation p-value and the exact tail, computed another way: the
    null distribution of |A ∩ B| by counting subsets (all of them for small N, a generating function otherwise); the
    permutations drawn one at a time."""
    n, n_a, n_b = len(a), int(a.sum()), int(b.sum())
    both = int((a & b).sum())
    jac = lambda x: x / (n_a + n_b - x) if n_a + n_b - x else float("nan")  # noqa: E731
    if n <= 12:
        counts = {}
        for subset in itertools.combinations(range(n), n_b):
            x = int(a[list(subset)].sum())
            counts[x] = counts.get(x, 0) + 1
    else:  # coefficient of u^n_b t^x in (1 + t u)^n_a (1 + u)^(n − n_a), by dynamic programming
        table = np.zeros((n_b + 1, n_a + 1), dtype=object)
        table[0, 0] = 1
        for inside in [True] * n_a + [False] * (n - n_a):
            new = table.copy()
            new[1:, 1 if inside else 0:] += table[:-1, :n_a if inside else n_a + 1]
            table = new
        counts = {x: int(table[n_b, x]) for x in range(n_a + 1) if table[n_b, x]}
    total = sum(counts.values())
    expected = sum(c * jac(x) for x, c in counts.items()) / total
    exact = sum(c for x, c in counts.items() if x >= both) / total
    rng, hits = np.random.default_rng(seed), 0
    for _ in range(n_permutations):
        perm = b[np.argsort(rng.random(n))]
        hits += jac(int((a & perm).sum())) >= jac(both) - 1e-12
    return jac(both), expected, (1 + hits) / (1 + n_permutations), exact


def test_overlaps_equal_a_hand_computation(atlases):
    for atlas in atlases.values():
        ov = atlas.overlaps(n_permutations=300, seed=3)
        names = atlas.role_names
        assert list(zip(ov["role_a"], ov["role_b"])) == list(itertools.combinations(names, 2))
        for row in ov.itertuples():
            a, b = atlas.roles[row.role_a].to_numpy(), atlas.roles[row.role_b].to_numpy()
            assert (row.n, row.n_a, row.n_b, row.both) == (len(a), a.sum(), b.sum(), (a & b).sum())
            if not (a.any() or b.any()):
                assert np.isnan([row.jaccard, row.expected, row.p_value, row.p_exact]).all()
                continue
            jaccard, expected, p_value, exact = _hand_overlap(a, b, 300, 3)
            assert row.jaccard == pytest.approx(jaccard)
            assert row.expected == pytest.approx(expected)
            assert row.p_value == pytest.approx(p_value)
            assert row.p_exact == pytest.approx(exact)
            assert abs(row.p_value - exact) < 0.1  # the permutation test estimates the exact tail
    pd.testing.assert_frame_equal(atlas.overlaps(seed=1), atlas.overlaps(seed=1))  # deterministic


def test_correlations_and_layer_profiles_equal_a_hand_computation(atlases):
    atlas = atlases["stories"]
    corr = atlas.correlations()
    assert list(corr.index) == list(corr.columns) == atlas.scores
    for x, y in itertools.combinations(atlas.scores, 2):
        both = atlas.heads[[x, y]].dropna()
        rx, ry = both[x].rank().to_numpy(), both[y].rank().to_numpy()
        hand = np.corrcoef(rx, ry)[0, 1] if rx.std() and ry.std() else np.nan
        assert corr.loc[x, y] == pytest.approx(hand, nan_ok=True), (x, y)
    profiles = atlas.layer_profiles()
    for role in atlas.role_names:
        for layer in sorted(set(atlas.roles["layer"])):
            mine = atlas.roles[atlas.roles["layer"] == layer][role]
            assert profiles.loc[layer, role] == pytest.approx(mine.sum() / len(mine))


def test_role_rules_top_sign_and_threshold():
    s = pd.Series([0.5, -3.0, 2.0, 2.0, np.nan, 1.0])
    top = lambda **kw: Role("r", "s", rule="top", **kw).apply(s).tolist()  # noqa: E731
    assert top(fraction=0.4) == [False, False, True, True, False, False]    # round(0.4 · 5 scored) = 2, ties in order
    assert top(fraction=0.2) == [False, False, True, False, False, False]
    assert top(fraction=0.2, sign=-1) == [False, True, False, False, False, False]
    assert top(fraction=0.01, sign=0) == [False, True, False, False, False, False]  # at least one head
    thr = lambda **kw: Role("r", "s", **kw).apply(s).tolist()  # noqa: E731
    assert thr(threshold=1.0) == [False, False, True, True, False, False]
    assert thr(threshold=1.0, inclusive=True) == [False, False, True, True, False, True]
    assert thr(threshold=0.0, sign=-1) == [False, True, False, False, False, False]
    assert thr(threshold=2.0, sign=0) == [False, True, False, False, False, False]
    assert Role("r", "s", threshold=0.1, param="t").resolved({"t": 0.7}).threshold == 0.7
    with pytest.raises(ValueError, match="fraction"):
        Role("r", "s", rule="top")
    with pytest.raises(ValueError, match="rule"):
        Role("r", "s", rule="median")


def test_every_declared_role_reads_a_score_of_its_analysis():
    for name, analysis in ANALYSES.items():
        for role in analysis.roles:
            if role.rule == "class":  # a label column of its heads table (taxonomy's pattern)
                assert role.value and role.score not in analysis.scores, (name, role)
            elif name != "circuits":  # its role reads each task's column (roles_of)
                assert role.score in analysis.scores, (name, role)
            assert role.description


@pytest.mark.parametrize("rule", [{"circuit_percent": 25}, {"circuit_threshold": 0.3}])
def test_circuit_roles_are_the_runs_circuits(rule):
    circuits = get_analysis("circuits")
    params = circuits.resolve({"tasks": "ioi,colored_objects", **rule})
    rng = np.random.default_rng(0)
    heads = pd.DataFrame({"layer": np.repeat(np.arange(4), 4), "head": np.tile(np.arange(4), 4)})
    for col in ("ioi_patching", "ioi_eap", "colored_objects_patching", "colored_objects_eap"):
        heads[col] = rng.normal(0, 0.4, len(heads))
    roles = circuits.roles_of(params, list(heads.columns[2:]))
    assert [r.name for r in roles] == ["circuit_ioi", "circuit_colored_objects"]
    for role, task in zip(roles, ("ioi", "colored_objects")):
        assert _heads(role.apply(heads[role.score]), heads) == set(circuit_heads(heads, f"{task}_patching", params))


def test_an_atlas_refuses_runs_it_cannot_join(stored):
    store, runs = stored
    planted_runs = [interp.open_run(r, store) for r in runs["planted"]]
    story = interp.open_run(runs["stories"][0], store)
    with pytest.raises(ValueError, match="one model"):
        Atlas([planted_runs[0], story])
    with pytest.raises(ValueError, match="one run per analysis"):
        Atlas([planted_runs[0], planted_runs[0]])
    with pytest.raises(ValueError, match="at least one"):
        Atlas([])
    half = interp.ScoreResult(dict(story.meta, status="incomplete"), story.heads, story.samples)
    with pytest.raises(ValueError, match="incomplete"):
        Atlas([half])


# atlas and `interp atlas`: every analysis that applies, one run each in the store, reused when complete.
TINY = {"summary": {"samples": 2, "max_tokens": 32}, "sinks": {"samples": 2, "max_tokens": 32},
        "taxonomy": {"samples": 2, "max_tokens": 32}, "lookback": {"samples": 2, "max_tokens": 32},
        "retrieval": {"lengths": [200], "depths": [50], "n_needles": 1, "mask_k": [0], "max_new_tokens": 4},
        "circuits": {"samples": 1, "methods": "eap", "batch": 4}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The atlas of stories260k built twice in one store with a tiny "quick" preset: (store, first, second)."""
    import interp.atlases

    store = tmp_path_factory.mktemp("built") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(interp.atlases.PRESETS, "quick", TINY)
        first = interp.atlas("stories260k", store=store)
        second = interp.atlas(interp.load_model("stories260k"), "quick", store)
    return store, first, second


def test_atlas_scores_what_applies(built):
    store, atlas, _ = built
    assert isinstance(atlas, Atlas) and atlas.model == "stories260k"
    assert set(atlas.runs) == {"summary", "sinks", "taxonomy", "lookback", "retrieval"}
    assert set(atlas.skipped) == {"vit", "vhd", "circuits"}  # not decoders' analyses; circuits' names: no tokenizer
    assert "does not apply" in atlas.skipped["vit"] and "one token" in atlas.skipped["circuits"]
    stored = {r.id: r for r in interp.list_runs(store)}
    assert set(stored) == {*atlas.runs.values(), atlas.id}  # one run per analysis and the atlas's entry
    assert stored[atlas.id].meta["analysis"] == "atlas" and stored[atlas.id].meta["runs"] == atlas.runs
    assert interp.open_run(atlas.runs["retrieval"], store).meta["params"]["mask_k"] == [0]
    assert interp.open_run(atlas.runs["summary"], store).meta["options"]["samples"] == 2
    assert {"taxonomy.induction", "lookback.lookback", "sinks.sink", "retrieval.retrieval"} <= set(atlas.role_names)


def test_atlas_reuses_complete_runs(built):
    store, first, second = built
    assert second.runs == first.runs and second.id == first.id  # the same runs and entry: nothing rescored
    assert len(interp.list_runs(store)) == len(first.runs) + 1
    pd.testing.assert_frame_equal(second.roles, first.roles)


def test_atlas_subset_and_errors(built, tmp_path):
    store, first, _ = built
    part = interp.atlas("stories260k", TINY, store, analyses=["lookback", "vit"])
    assert part.runs == {"lookback": first.runs["lookback"]} and set(part.skipped) == {"vit"}
    with pytest.raises(ValueError, match="unknown preset"):
        interp.atlas("stories260k", "slow", store)
    with pytest.raises(ValueError, match="unknown analysis"):
        interp.atlas("stories260k", TINY, store, analyses=["nope"])
    with pytest.raises(ValueError, match="no analysis gave a run"):
        interp.atlas("stories260k", TINY, tmp_path / "empty", analyses=["vit", "vhd"])


def test_cli_atlas_json_and_text(built, capsys, monkeypatch):
    import interp.atlases
    from interp.cli import main

    store, atlas, _ = built
    monkeypatch.setitem(interp.atlases.PRESETS, "quick", TINY)
    capsys.readouterr()
    assert main(["atlas", "stories260k", "--out", str(store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["runs"] == atlas.runs and set(doc["skipped"]) == set(atlas.skipped)
    assert doc["roles"] == {name: [f"{r.layer}-{r.head}" for r in atlas.roles[atlas.roles[name]].itertuples()]
                            for name in atlas.role_names}
    expected = atlas.overlaps()
    assert len(doc["overlaps"]) == len(expected)
    assert [(o["role_a"], o["role_b"], o["both"]) for o in doc["overlaps"]] == \
        list(zip(expected["role_a"], expected["role_b"], expected["both"]))
    assert doc["id"] == atlas.id  # the CLI reused the runs and the entry
    assert {r.id for r in interp.list_runs(store) if r.meta["analysis"] != "atlas"} == set(atlas.runs.values())
    assert main(["atlas", "stories260k", "--out", str(store)]) == 0
    out = capsys.readouterr().out
    assert "Roles:" in out and "(p < 0.05)" in out and all(run in out for run in atlas.runs.values())
    for name, heads in doc["roles"].items():
        assert f"{name} ({len(heads)}): {', '.join(heads) or '-'}" in out


def test_the_atlas_is_one_store_entry_listed_shown_and_exported(built, capsys):
    from interp.cli import main

    store, atlas, _ = built
    again = interp.open_atlas(atlas.id[:-2], store)  # a unique prefix
    assert again.id == atlas.id and again.runs == atlas.runs and again.skipped == atlas.skipped
    pd.testing.assert_frame_equal(again.roles, atlas.roles)
    pd.testing.assert_frame_equal(again.heads, atlas.heads)
    with pytest.raises(ValueError, match="is a summary run, not an atlas"):
        interp.open_atlas(atlas.runs["summary"], store)
    entry = interp.open_run(atlas.id, store)
    pd.testing.assert_frame_equal(entry.heads, atlas.table(), check_dtype=False)
    pd.testing.assert_frame_equal(entry.tables["overlaps"], atlas.overlaps(), check_dtype=False)
    assert {"role:" + name for name in atlas.role_names} <= set(entry.heads.columns)
    assert entry.heads.loc[entry.heads["layer"].eq(1) & entry.heads["head"].eq(2), "summary.entropy"].item() == \
        pytest.approx(atlas.card(1, 2)["scores"]["summary.entropy"]["value"])

    capsys.readouterr()
    assert main(["runs", "--store", str(store)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(atlas.id))
    assert " atlas " in line and "stories260k" in line
    assert main(["show", atlas.id, "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"Atlas {atlas.id} of stories260k" in out and all(run in out for run in atlas.runs.values())
    for name in atlas.role_names:
        heads = [f"{r.layer}-{r.head}" for r in atlas.roles[atlas.roles[name]].itertuples()]
        assert f"{name} ({len(heads)}): {', '.join(heads) or '-'}" in out
    assert main(["show", atlas.id, "--store", str(store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "atlas" and doc["runs"] == atlas.runs
    assert doc["roles"] == {n: [f"{r.layer}-{r.head}" for r in atlas.roles[atlas.roles[n]].itertuples()]
                            for n in atlas.role_names}
    assert main(["export", atlas.id, "--store", str(store)]) == 0
    exported = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(exported.columns) == list(atlas.table().columns) and len(exported) == len(atlas.heads)


def _with_scores(result, changes: dict):
    """A copy of a ScoreResult whose heads table has {(layer, head, score): value} changed."""
    heads = result.heads.copy()
    for (layer, head, score), value in changes.items():
        heads.loc[heads["layer"].eq(layer) & heads["head"].eq(head), score] = value
    return interp.ScoreResult(result.meta, heads, result.samples, result.path, result.tables)


def test_compare_atlases_by_layer_and_head(stored):
    from interp.atlases import compare_atlases

    store, runs = stored
    results = [interp.open_run(r, store) for r in runs["stories"]]
    a = Atlas(results)
    tax = next(r for r in results if r.analysis == "taxonomy")
    first = a.roles.index[a.roles["taxonomy.induction"]]
    lose = (int(a.roles.loc[first[0], "layer"]), int(a.roles.loc[first[0], "head"])) if len(first) else None
    gain = next((int(r.layer), int(r.head)) for r in a.roles[~a.roles["taxonomy.induction"]].itertuples())
    changes = {(*gain, "induction"): 0.9} | ({(*lose, "induction"): 0.0} if lose else {})
    b = Atlas([_with_scores(tax, changes) if r is tax else r for r in results])
    table = compare_atlases(a, b).set_index("role")
    assert set(table.index) == set(a.role_names) and (table["match"] == "layer-head").all()
    row = table.loc["taxonomy.induction"]
    x, y = a.roles["taxonomy.induction"].to_numpy(), b.roles["taxonomy.induction"].to_numpy()
    assert (row["n_a"], row["n_b"], row["both"]) == (x.sum(), y.sum(), (x & y).sum())
    assert row["jaccard"] == pytest.approx((x & y).sum() / (x | y).sum())
    assert row["only_b"] == f"{gain[0]}-{gain[1]}" and row["only_a"] == (f"{lose[0]}-{lose[1]}" if lose else "")
    same = table.drop(index="taxonomy.induction")
    assert (same["only_a"] == "").all() and (same["only_b"] == "").all()
    assert ((same["jaccard"] == 1) | (same["n_a"] == 0)).all()


def test_compare_atlases_by_relative_depth(atlases):
    from interp.atlases import compare_atlases

    a, b = atlases["stories"], atlases["planted"]
    assert a.heads["layer"].max() != b.heads["layer"].max()
    table = compare_atlases(a, b).set_index("role")
    shared = [r for r in a.role_names if r in b.rules]
    assert shared and (table.loc[shared, "match"] == "relative depth").all()
    assert set(table.loc[[r for r in a.role_names if r not in b.rules], "match"]) <= {"only in A"}
    for role in shared:
        la, lb = a.heads["layer"].max(), b.heads["layer"].max()
        fa = a.roles.groupby("layer")[role].mean()
        fb = b.roles.groupby("layer")[role].mean()
        at = np.interp(fa.index / la, fb.index / lb, fb.to_numpy())
        hand = np.corrcoef(fa.to_numpy(float), at)[0, 1] if fa.std() > 0 and at.std() > 0 else np.nan
        assert table.loc[role, "profile_corr"] == pytest.approx(hand, nan_ok=True)
        depth = a.heads.loc[a.roles[role].to_numpy(), "layer"] / la
        assert table.loc[role, "depth_a"] == pytest.approx(depth.mean() if len(depth) else np.nan, nan_ok=True)


def test_cli_atlas_compare(built, capsys, monkeypatch):
    import interp.atlases
    from interp.cli import main

    store, atlas, _ = built
    monkeypatch.setitem(interp.atlases.PRESETS, "quick", TINY)
    capsys.readouterr()
    assert main(["atlas", "stories260k", "--out", str(store), "--compare", atlas.id, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["compare"]
    assert [r["role"] for r in rows] == atlas.role_names and {r["match"] for r in rows} == {"layer-head"}
    assert all(r["only_a"] == r["only_b"] == "" for r in rows)
    assert main(["atlas", "stories260k", "--out", str(store), "--compare", atlas.id]) == 0
    out = capsys.readouterr().out
    assert f"Compared with atlas {atlas.id} of stories260k (heads matched by layer-head)" in out
    assert "lost in B: -; gained in B: -" in out


def test_to_html_is_one_self_contained_page(atlases, tmp_path):
    import html

    atlas = atlases["planted"]
    path = atlas.to_html(tmp_path / "atlas.html")
    page = path.read_text()
    assert '<script src="http' not in page
    assert 'src="http' not in page
    assert "Plotly" in page and len(page) > 1_000_000  # plotly.js inlined
    assert 'id="role-grid"' in page and 'id="overlaps"' in page
    for name in atlas.role_names:
        assert html.escape(name) in page
    for run in atlas.runs.values():
        assert run in page
    for layer, head in zip(atlas.heads["layer"], atlas.heads["head"]):
        assert f'id="head-{layer}-{head}"' in page and f"head {layer}-{head} " in page
    card = atlas.card(0, 0)
    col, entry = next((c, e) for c, e in card["scores"].items() if e["value"] is not None)
    assert f"<td>{html.escape(col)}</td><td>{entry['value']:.4g}</td>" in page
    with pytest.raises(ValueError, match="folder"):
        atlas.to_html(tmp_path)


def test_role_grid_and_overlap_matrix(atlases):
    from interp.app.figures import overlap_matrix, role_grid

    atlas = atlases["planted"]
    fig = role_grid(atlas)
    names = [t.name for t in fig.data]
    assert names[0] == "no role" and names[1:1 + len(atlas.role_names)] == atlas.role_names
    member = atlas.roles[atlas.role_names].to_numpy(bool)
    for trace, col in zip(fig.data[1:], member.T):
        assert len(trace.x) == col.sum()
    several = member.sum(1) > 1
    assert ("several roles" in names) == several.any()
    assert all(t.startswith("head ") and "-" in t for t in fig.data[0].text)
    m = overlap_matrix(atlas)
    z = np.array(m.data[0].z, dtype=float)
    rows = atlas.overlaps()
    at = {n: i for i, n in enumerate(atlas.role_names)}
    for r in rows.itertuples():
        assert z[at[r.role_a], at[r.role_b]] == pytest.approx(r.jaccard, nan_ok=True)
        assert z[at[r.role_b], at[r.role_a]] == pytest.approx(r.jaccard, nan_ok=True)
    assert "chance" in m.data[0].hovertemplate and "p = " in m.data[0].hovertemplate


def test_cli_atlas_html_and_refused_paths(built, capsys, monkeypatch, tmp_path):
    import interp.atlases
    from interp.cli import main

    store, atlas, _ = built
    monkeypatch.setitem(interp.atlases.PRESETS, "quick", TINY)
    capsys.readouterr()
    out = tmp_path / "page.html"
    assert main(["atlas", "stories260k", "--out", str(store), "--json", "--html", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)  # the JSON is unchanged
    assert doc["runs"] == atlas.runs
    page = out.read_text()
    assert 'src="http' not in page and all(run in page for run in atlas.runs.values())
    assert main(["atlas", "stories260k", "--out", str(store), "--html", str(tmp_path)]) == 1
    assert "folder" in capsys.readouterr().err
    assert main(["atlas", "stories260k", "--out", str(store), "--html", str(store / "x.html")]) == 1
    assert "inside the store" in capsys.readouterr().err
    assert not (store / "x.html").exists()


@pytest.mark.slow
def test_atlas_page_renders_offline_in_chromium(atlases, tmp_path):
    import os
    import shutil
    from pathlib import Path

    chromium = os.environ.get("INTERP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail(f"no Chromium at {chromium}: install it (Debian: apt-get install chromium) or set INTERP_CHROMIUM")
    from playwright.sync_api import sync_playwright

    atlas = atlases["planted"]
    path = atlas.to_html(tmp_path / "atlas.html")
    requested, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                          "--disable-background-networking", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))

            def block(route):
                requested.append(route.request.url)
                route.abort()

            page.route("http://**/*", block)
            page.route("https://**/*", block)
            page.goto(path.as_uri())
            page.wait_for_selector("#role-grid svg.main-svg", timeout=15000)
            page.wait_for_selector("#overlaps svg.main-svg", timeout=15000)
            assert page.locator("#role-grid .plot-container").count() == 1
            assert page.locator("#head-0-0").is_visible()
            assert "head 0-0" in page.locator("#head-0-0").inner_text()
            page.fill("#search", "0-1")
            assert not page.locator("#head-0-0").is_visible() and page.locator("#head-0-1").is_visible()
        finally:
            browser.close()
    assert not requested, f"the page asked the network for {requested}"
    assert not errors, f"JavaScript errors in the page: {errors}"
