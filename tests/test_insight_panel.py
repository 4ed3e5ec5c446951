"""The page's weight report and "Suggest a merge": the numbers shown equal a hand computation on the
fixtures' tensors, a search streams its candidates and its best fills the config, and requests over the
app's bounds are refused with the bound named. Driven through gradio_client and the page's handlers."""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from app_harness import TOKEN, served_app  # noqa: E402
from hostile_catalogue import CATALOGUE  # noqa: E402
from merger import constants  # noqa: E402
from merger.config.load import load_config  # noqa: E402

FIXTURES = Path(__file__).parent / "data" / "fixtures"
# Short pasted text (halved: search and judging splits) keeps a search to seconds on the tiny fixtures.
PASTED = (FIXTURES / "prose_eval.txt").read_text(encoding="utf-8")[:1600]


def ties_yaml(family: str = "mistral") -> str:
    base, prose, code = (FIXTURES / f"{family}-{kind}" for kind in ("base", "prose", "code"))
    return (f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {prose}\n    parameters: {{weight: 1, density: 0.5}}\n"
            f"  - model: {code}\n    parameters: {{weight: 1, density: 0.5}}\ndtype: bfloat16\n")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    with served_app(tmp_path_factory.mktemp("data")) as (client, demo):
        yield client, demo


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def handler(demo: gr.Blocks, name: str):
    return next(f.fn for f in demo.fns.values() if f.name == name)


def by_id(demo: gr.Blocks, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def config_state(demo: gr.Blocks) -> gr.State:
    return [b for b in demo.blocks.values() if isinstance(b, gr.State)][0]


def layout_state(demo: gr.Blocks) -> gr.State:
    return [b for b in demo.blocks.values() if isinstance(b, gr.State)][1]


def suggested_state(demo: gr.Blocks) -> gr.State:
    """The best candidate's YAML, once a search ends (the page's third state, the insight panel's)."""
    return [b for b in demo.blocks.values() if isinstance(b, gr.State)][2]


def report_page(demo: gr.Blocks, text: str) -> dict:
    """The page's last update after "Weight report" with `text` as the config (the first says it is reading)."""
    updates = list(handler(demo, "on_report")({config_state(demo): text}))
    assert "Reading the models' weights" in updates[0][by_id(demo, "report-notes")]
    return updates[-1]


def hand_layer(family: str, layer: int) -> dict:
    """Relative norms, cosine and sign-conflict share of one decoder layer's task vectors, in float64 from
    the safetensors files (independent of the engine's streaming reader)."""
    tensors = {kind: load_file(str(FIXTURES / f"{family}-{kind}" / "model.safetensors"))
               for kind in ("base", "prose", "code")}
    names = sorted(n for n in tensors["base"] if f".layers.{layer}." in n)
    flat = {kind: torch.cat([tensors[kind][n].double().reshape(-1) for n in names]) for kind in tensors}
    prose, code = flat["prose"] - flat["base"], flat["code"] - flat["base"]
    both = (prose != 0) & (code != 0)
    return {
        "relative": [float(t.norm() / flat["base"].norm()) for t in (prose, code)],
        "cos": float(prose @ code / (prose.norm() * code.norm())),
        "conflicts": int(((prose.sign() * code.sign()) < 0).sum()) / int(both.sum()),
    }


def test_the_report_shows_the_hand_computed_numbers(served) -> None:
    client, demo = served
    expected = hand_layer("mistral", 1)
    via_api = client.predict(ties_yaml(), api_name="/weight_report")
    headers = via_api["headers"]
    assert headers == ["group", "‖τ M1‖/‖base‖", "‖τ M2‖/‖base‖", "cos M1·M2",
                       "sign conflicts M1·M2"]
    row = next(r for r in via_api["rows"] if r[0] == "layer 1")
    assert row[1:3] == pytest.approx(expected["relative"], rel=1e-6)
    assert row[3] == pytest.approx(expected["cos"], rel=1e-6)
    assert row[4] == pytest.approx(expected["conflicts"], rel=1e-9)
    assert [r[0] for r in via_api["rows"]] == ["embeddings", "layer 0", "layer 1", "layer 2", "layer 3",
                                               "other", "head", "all"]

    # The page: the same numbers in the heatmap table, coloured by value, and the legend in words.
    updates = report_page(demo, ties_yaml())
    table = updates[by_id(demo, "report-table")]
    frame = table.data
    shown = frame[frame["group"] == "layer 1"].iloc[0]
    assert shown["cos M1·M2"] == pytest.approx(expected["cos"], rel=1e-6)
    relative = [shown["‖τ M1‖/‖base‖"], shown["‖τ M2‖/‖base‖"]]
    assert relative == pytest.approx(expected["relative"], rel=1e-6)
    html = table.to_html()
    assert f"{expected['cos']:.4f}" in html and f"{expected['conflicts']:.1%}" in html
    assert "background-color: rgba(33, 102, 172" in html  # positive cosines: blue cells
    notes = updates[by_id(demo, "report-notes")]
    assert "**M1** = `" in notes and "mistral-prose" in notes and "No warnings" in notes


def test_the_report_warns_in_words_where_the_method_misbehaves(served) -> None:
    """The fixtures' heads moved in slightly opposed directions: model_stock's ratio flips sign there."""
    _, demo = served
    text = ties_yaml().replace("merge_method: ties", "merge_method: model_stock")
    updates = report_page(demo, text)
    frame = updates[by_id(demo, "report-table")].data
    opposed = list(frame[frame["cos M1·M2"] < 0]["group"])
    assert opposed == ["head"]  # the hand-checkable sign: see the cosine row of the heatmap
    notes = updates[by_id(demo, "report-notes")]
    assert "⚠️ model_stock: the task vectors of" in notes
    assert "opposite directions (negative cosine) in head" in notes


def test_a_suggestion_streams_candidates_and_its_best_fills_the_config(served) -> None:
    client, demo = served
    job = client.submit(ties_yaml(), 2, 2.0, PASTED, api_name="/suggest")
    events = list(job)
    candidates = [e["candidate"] for e in events if "candidate" in e]
    assert len(candidates) == 2 and [c["number"] for c in candidates] == [1, 2]
    final = events[-1]
    assert final["best"] == min(candidates, key=lambda c: c["bits"]) and final["tried"] == 2

    # The page: the table grows candidate by candidate, then the best's YAML fills the config state.
    inputs = {config_state(demo): ties_yaml(), by_id(demo, "budget-candidates"): 2,
              by_id(demo, "budget-minutes"): 2.0, by_id(demo, "suggest-text"): PASTED}
    updates = list(handler(demo, "on_suggest")(inputs))
    tables = [u[by_id(demo, "suggest-table")] for u in updates if u.get(by_id(demo, "suggest-table"))]
    assert [len(t) for t in tables] == [1, 2]
    suggested = updates[-1][suggested_state(demo)]
    filled = handler(demo, "on_suggested")({suggested_state(demo): suggested,
                                            layout_state(demo): layout_state(demo).value})
    text = filled[config_state(demo)]
    best = min(tables[-1], key=lambda row: row[1])
    config = load_config(text)  # parses and validates
    assert config.merge_method == best[2] == final["best"]["method"]
    assert "Suggested (now in the form)" in updates[-1][by_id(demo, "suggest-status")]
    assert str(config.base_model) == str(FIXTURES / "mistral-base")
    # The parameters of the best candidate, e.g. `weight=1,1 lambda=0.7`, are the YAML's.
    for part in best[3].split():
        name, values = part.split("=")
        values = [float(v) for v in values.split(",")]
        if len(values) == 1:
            assert config.parameters[name] == pytest.approx(values[0]), name
        else:
            assert [m.parameters[name] for m in config.models] == pytest.approx(values), name


@pytest.mark.parametrize("setting, value, arguments, reason", [
    ("INSIGHT_MAX_BYTES", 10**6, (), "GB of weights, over this app's 0.00 GB limit"),
    ("SUGGEST_MAX_BYTES", 2**20, (2, 1.0), "GiB of float32 weights, over this app's"),
    ("SUGGEST_MAX_CANDIDATES", 4, (5, 1.0), "candidates: 5 is outside 1-4"),
    ("SUGGEST_MAX_MINUTES", 2, (2, 3.0), "minutes: 3 is outside 0-2"),
])
def test_requests_over_the_bounds_are_refused_with_the_reason(
    served, monkeypatch: pytest.MonkeyPatch, setting: str, value: int, arguments: tuple, reason: str
) -> None:
    client, _ = served
    monkeypatch.setattr(constants, setting, value)
    endpoint = "/suggest" if arguments else "/weight_report"
    with pytest.raises(AppError, match=reason) as caught:
        client.predict(ties_yaml(), *arguments, api_name=endpoint)
    assert caught.value.title == "InsightLimitError"


def test_a_second_search_is_refused_while_one_runs(served) -> None:
    from merger.service import insight

    client, _ = served
    assert insight._search_slot.acquire(blocking=False)
    try:
        with pytest.raises(AppError, match="another merge suggestion is running"):
            client.predict(ties_yaml(), 2, 1.0, api_name="/suggest")
    finally:
        insight._search_slot.release()


@pytest.mark.parametrize("text, reason", [
    ("merge_method: ties\nbase_model: {p}\nmodels:\n  - model: {p}\n  - model: {c}\n", "needs `base_model` set"),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {p}\n", "takes two or three fine-tunes"),
])
def test_a_config_without_a_base_and_fine_tunes_is_refused_by_name(served, text: str, reason: str) -> None:
    client, _ = served
    text = text.format(b=FIXTURES / "mistral-base", p=FIXTURES / "mistral-prose", c=FIXTURES / "mistral-code")
    with pytest.raises(AppError, match=reason):
        client.predict(text, 2, 1.0, api_name="/suggest")


def test_a_space_refuses_local_paths(served, monkeypatch: pytest.MonkeyPatch) -> None:
    from merger.ui import api

    client, _ = served
    monkeypatch.setattr(constants, "ON_SPACE", True)
    monkeypatch.setattr(api, "token_of", lambda oauth_token=None: TOKEN)  # a signed-in visitor
    with pytest.raises(AppError, match="local paths are not available here"):
        client.predict(ties_yaml(), api_name="/weight_report")


@pytest.mark.parametrize("endpoint", ["/weight_report", "/suggest"])
def test_a_space_refuses_signed_out_visitors_before_any_hub_call(served, monkeypatch: pytest.MonkeyPatch,
                                                                 endpoint: str) -> None:
    # Signed out, a visitor would make the Space download up to INSIGHT_MAX_BYTES per request, unnamed;
    # the models do not exist, so a Hub call would answer ModelNotFoundError instead.
    client, _ = served
    monkeypatch.setattr(constants, "ON_SPACE", True)
    args = (2, 1.0) if endpoint == "/suggest" else ()
    with pytest.raises(AppError) as refused:
        client.predict("merge_method: ties\nbase_model: alice/a\nmodels:\n  - model: alice/b\n  - model: alice/c\n",
                       *args, api_name=endpoint)
    assert refused.value.title == "SignInRequiredError" and "sign in with Hugging Face" in refused.value.message


def test_the_page_states_the_bounds(served) -> None:
    _, demo = served
    notes = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown) and b.value]
    assert any(f"{constants.INSIGHT_MAX_BYTES / 1e9:.1f} GB of weights" in n
               and f"{constants.SUGGEST_MAX_CANDIDATES} candidates" in n for n in notes)


@pytest.fixture(scope="module")
def hub_models(hub) -> dict[str, str]:
    """The mistral fixtures on the loopback Hub, as `alice/insight-<kind>`."""
    return {kind: hub.upload_model(FIXTURES / f"mistral-{kind}", f"alice/insight-{kind}")
            for kind in ("base", "prose", "code")}


def hub_yaml(hub_models: dict[str, str]) -> str:
    return (f"merge_method: ties\nbase_model: {hub_models['base']}\nmodels:\n"
            f"  - model: {hub_models['prose']}\n    parameters: {{weight: 1, density: 0.5}}\n"
            f"  - model: {hub_models['code']}\n    parameters: {{weight: 1, density: 0.5}}\n")


def test_the_report_of_hub_models_reads_them_and_refuses_what_would_not_fit_on_disk(
    served, hub_models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = served
    rows = client.predict(hub_yaml(hub_models), api_name="/weight_report")["rows"]
    expected = hand_layer("mistral", 2)
    assert next(r for r in rows if r[0] == "layer 2")[3] == pytest.approx(expected["cos"], rel=1e-6)

    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10**6))
    with pytest.raises(AppError, match=r"GB to download\) do not fit in the 0.00 GB free") as caught:
        client.predict(hub_yaml(hub_models), api_name="/weight_report")
    assert caught.value.title == "InsightLimitError"


def test_a_copy_of_the_base_is_warned_as_adding_nothing(served, tmp_path: Path) -> None:
    """τ = 0: no cosine to show (empty cells, not an error) and the warning in words."""
    import shutil

    client, demo = served
    copy = shutil.copytree(FIXTURES / "mistral-base", tmp_path / "base-copy")
    text = ties_yaml().replace(str(FIXTURES / "mistral-code"), str(copy))
    answer = client.predict(text, api_name="/weight_report")
    total = answer["rows"][-1]
    assert total[0] == "all" and total[2] == 0.0 and total[3] is None  # M2's relative norm; the cosine (NaN)
    assert any("is almost its base" in w and "base-copy" in w for w in answer["warnings"])
    updates = report_page(demo, text)
    notes = updates[by_id(demo, "report-notes")]
    assert "⚠️" in notes and "adds almost nothing" in notes
    assert ">—<" in updates[by_id(demo, "report-table")].to_html()  # the undefined cosine shown as a dash


def test_a_budget_spent_before_the_first_candidate_says_so(served) -> None:
    client, _ = served
    with pytest.raises(AppError, match=r"ran out while loading the models, before the first candidate") as caught:
        client.predict(ties_yaml(), 2, 0.0001, api_name="/suggest")
    assert caught.value.title == "SearchError"


def test_a_report_over_the_time_limit_is_refused_with_the_limit(served, monkeypatch: pytest.MonkeyPatch) -> None:
    client, demo = served
    monkeypatch.setattr(constants, "INSIGHT_TIMEOUT_S", 0.001)
    with pytest.raises(AppError, match=r"did not finish within this app's 0.001-second limit") as caught:
        client.predict(ties_yaml("qwen2"), api_name="/weight_report")
    assert caught.value.title == "InsightLimitError"
    notes = report_page(demo, ties_yaml("qwen2"))[by_id(demo, "report-notes")]
    assert notes.startswith("**No report:** the weight report (downloading and reading the weights) did not finish")


CONFIG_ATTACKS = [entry for entry in CATALOGUE if entry.via == "config"]


@pytest.mark.parametrize("entry", CONFIG_ATTACKS, ids=[entry.id for entry in CONFIG_ATTACKS])
def test_every_hostile_config_is_refused_by_name_before_any_weight_is_read(entry) -> None:
    """The catalogue's configs, straight to the service (a lone surrogate cannot cross HTTP): the report
    and the search refuse each with the error the validator gives, quickly."""
    from merger import service

    for ask in (lambda: service.weight_report(entry.text, None), lambda: service.suggest(entry.text, None, 2, 1.0)):
        started = time.monotonic()
        with pytest.raises(entry.error):
            ask()
        assert time.monotonic() - started < 5.0
