"""Every hostile config of the catalogue is refused with its named error, in bounded time, memory and words.

Here through the library (`validate_config`, `decode_config`); tests/test_hostile_requests.py sends the same
entries through the CLI, /validate, /submit and /load_link."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from merger.config.load import load_config
from merger.engine import run_merge
from merger.errors import ChatTemplateError, ConfigError, ConfigProblems, ParameterValueError, excerpt
from merger.ui.config_view import parse as form_view_parse
from merger.links import decode_config
from merger.config.parse import Limits, parse_config_text
from merger.validate import validate_config
from tests.hostile_catalogue import CATALOGUE, Hostile, pack

ROOT = Path(__file__).parents[1]
FIXTURES = ROOT / "tests/data/fixtures"
MAX_SECONDS = 2.0
MAX_MESSAGE = 2000


def refuse(entry: Hostile) -> Exception:
    """Send the entry through its entry point; return the error raised (failing if none is)."""
    with pytest.raises(Exception) as info:
        if entry.via == "config":
            validate_config(entry.text)
        elif entry.via == "link":
            decode_config(pack(entry.text))
        else:
            decode_config(entry.text)
    return info.value


@pytest.mark.parametrize("entry", CATALOGUE, ids=[e.id for e in CATALOGUE])
def test_hostile_input_is_refused_by_name_quickly_and_briefly(entry: Hostile) -> None:
    start = time.perf_counter()
    error = refuse(entry)
    elapsed = time.perf_counter() - start
    assert type(error) is entry.error, f"{type(error).__name__}: {str(error)[:300]}"
    assert elapsed < MAX_SECONDS
    message = str(error)
    assert len(message) < MAX_MESSAGE
    assert "Traceback" not in message


def test_catalogue_is_large_and_ids_are_unique() -> None:
    assert len(CATALOGUE) >= 40
    assert len({e.id for e in CATALOGUE}) == len(CATALOGUE)


def test_the_bomb_costs_little_memory() -> None:
    bomb = next(e for e in CATALOGUE if e.id == "billion-laughs").text
    tracemalloc.start()
    try:
        for _ in range(3):
            with pytest.raises(Exception):
                load_config(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20  # the expanded document would hold 9^9 strings


def test_a_long_backticked_value_is_cut_and_cannot_close_the_code_span() -> None:
    error = refuse(next(e for e in CATALOGUE if e.id == "unknown-key-markdown"))
    message = str(error)
    assert message.startswith("`surprise` is not a known key (value `')](http://evil.example) **x**")
    assert "`)]" not in message  # the user's backtick became a quote, so the code span stays closed
    assert "characters)" in message  # the excerpt says it was cut


def test_excerpt_is_short_escaped_and_says_how_long_the_whole_was() -> None:
    assert excerpt("a" * 5_000_000) == "a" * 60 + "… (5,000,000 characters)"
    assert excerpt("x`y\n") == "x'y\\n"
    assert excerpt(1.5) == "1.5"
    assert len(excerpt({"k": ["v" * 1000] * 1000})) < 120


def test_a_template_path_gets_the_same_answer_whether_or_not_the_file_exists() -> None:
    messages = []
    for path in ("/etc/passwd", "/etc/no-such-file-here", "../templates/chat_templates/chatml"):
        with pytest.raises(ChatTemplateError) as info:
            load_config(next(e for e in CATALOGUE if e.id == "t-nan").text.replace(".nan", "0.5")
                        + f"chat_template: {path}\n")
        messages.append(str(info.value).replace(excerpt(path), "PATH"))
    assert messages[0] == messages[1] == messages[2]


@pytest.mark.parametrize("text", [e.text for e in CATALOGUE if e.via == "config"][:12], ids=[e.id for e in CATALOGUE if e.via == "config"][:12])
def test_the_form_never_raises_on_hostile_yaml(text: str) -> None:
    """The form reads the config through the one parser: what the parser refuses, the form shows nothing of."""
    try:
        data = parse_config_text(text)
    except ConfigError:
        data = None
    started = time.monotonic()
    assert form_view_parse(text) == (data if isinstance(data, dict) else None)
    assert time.monotonic() - started < 2


def test_one_problem_per_bad_value_in_lists_and_levels() -> None:
    text = ("merge_method: ties\nbase_model: org/base\nmodels:\n"
            "  - {model: org/a, parameters: {weight: [0.5, .nan], density: 2}}\n"
            "  - {model: org/b, parameters: {weight: 1, density: [{filter: mlp, value: -1}, {value: 0.5}]}}\n")
    with pytest.raises(ConfigProblems) as info:
        load_config(text)
    fields = [str(p).split("`")[1] for p in info.value.problems]
    assert fields == ["models[0].parameters.weight[1]", "models[0].parameters.density",
                      "models[1].parameters.density[0].value"]
    assert all(type(p) is ParameterValueError for p in info.value.problems)


def test_in_range_values_and_yaml_12_numbers_are_accepted() -> None:
    config = load_config("merge_method: karcher\nmodels: [{model: org/a}, {model: org/b}]\n"
                         "parameters: {max_iter: 10.0, tol: 1e-5}\nchat_template: chatml\nseed: 42\n")
    assert config.parameters == {"max_iter": 10.0, "tol": 1e-5}
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = load_config("merge_method: slerp\nbase_model: org/a\nmodels: [{model: org/a}, {model: org/b}]\n"
                         f"parameters: {{t: [0, 0.5, 1], normalize: 1}}\nchat_template: \"{jinja}\"\n")
    assert config.chat_template == jinja


def test_della_density_plus_epsilon_is_checked_at_validation() -> None:
    text = (f"merge_method: della\nbase_model: {FIXTURES / 'mistral-base'}\nmodels:\n"
            f"  - model: {FIXTURES / 'mistral-prose'}\n    parameters: {{weight: 1, density: 0.9, epsilon: 0.15}}\n")
    with pytest.raises(ParameterValueError, match=r"density \+ epsilon < 1.*density=0.9, epsilon=0.15"):
        validate_config(text)
    validate_config(text.replace("epsilon: 0.15", "epsilon: 0.05"))


def test_a_link_with_a_yaml_typo_still_opens_in_the_editor() -> None:
    text = "merge_method: slerp\nmodels: [unclosed\n"
    assert decode_config(pack(text)) == text  # the editor shows the YAML error, where it can be fixed


def test_limits_are_configurable_for_callers() -> None:
    small = Limits(max_nodes=10)
    assert parse_config_text("a: [1, 2, 3]", small) == {"a": [1, 2, 3]}
    with pytest.raises(Exception, match="more than 10 values"):
        parse_config_text("a: [" + ",".join("1" * 20) + "]", small)


def test_an_out_of_range_random_seed_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    text = (f"merge_method: slerp\nbase_model: {FIXTURES / 'mistral-base'}\nmodels:\n"
            f"  - model: {FIXTURES / 'mistral-base'}\n  - model: {FIXTURES / 'mistral-prose'}\nparameters: {{t: 0.5}}\n")
    with pytest.raises(ParameterValueError, match="--random-seed"):
        run_merge(text, tmp_path / "out", device="cpu", seed=-1)
    assert list(tmp_path.iterdir()) == []


def test_every_method_parameter_declares_its_range_and_one_without_is_not_registered() -> None:
    from merger.methods.registry import METHODS, merge_method
    from merger.ranges import Range

    assert all(isinstance(p.range, Range) for m in METHODS.values() for p in m.parameters)
    numeric = [p.range for m in METHODS.values() for p in m.parameters if p.range.kind is not bool]
    assert numeric and all(r.low is not None and r.high is not None for r in numeric)

    def undeclared(tensors: list, *, k: float = 1.0) -> None:  # noqa: ARG001
        return None

    with pytest.raises(TypeError, match="`k` needs `Annotated"):
        merge_method("undeclared-test", pretty_name="x", reference_url="x")(undeclared)
    assert "undeclared-test" not in METHODS


@pytest.mark.parametrize("t", ["0", "1", "0.0", "[0, 1]", "[{filter: mlp, value: 1}, {value: 0}]"])
def test_the_ends_of_a_range_are_allowed(t: str) -> None:
    text = f"merge_method: slerp\nbase_model: a/b\nmodels: [{{model: a/b}}, {{model: c/d}}]\nparameters: {{t: {t}}}\n"
    assert load_config(text).parameters["t"] is not None  # an exclusive bound would raise here


@pytest.mark.parametrize("template", [
    "{{ 'a'*10**10 }}", "{{ (9**9)**(9**9) }}", "{{ -(9**9**9) }}", "{{ 'a'|center(1000000000) }}",
    "{% if 'a'|indent(1000000000) is string %}x{% endif %}",
    "{% autoescape 'a'|center(1000000000) %}x{% endautoescape %}",
])
def test_a_chat_template_is_compiled_without_running_any_of_it(template: str) -> None:
    """Jinja folds constant expressions while compiling; the check must not compute them (time or memory)."""
    from merger.config.chat_template import check_chat_template

    tracemalloc.start()
    started = time.monotonic()
    try:
        check_chat_template(template)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2 and peak < 20 * 2**20


def test_an_integer_too_large_for_a_float_is_out_of_range_not_a_crash() -> None:
    text = f"merge_method: linear\nmodels:\n  - model: org/a\n    parameters: {{weight: {'9' * 400}}}\n"
    with pytest.raises(ParameterValueError, match=r"`models\[0\]\.parameters\.weight`"):
        load_config(text)


def test_a_token_glued_to_a_word_is_still_a_token() -> None:
    from merger.errors import TokenInConfigError

    for glued in ("my_hf_", "Xhf_", "1hf_"):
        with pytest.raises(TokenInConfigError):
            load_config(f"merge_method: linear\nmodels: [{{model: org/a}}]\n# {glued}AbCdEfGhIjKlMnOpQrStUvWxYz01234567\n")


def test_an_endless_file_is_read_only_past_the_limit_and_named_as_such(tmp_path: Path) -> None:
    from merger.config.parse import read_config_file
    from merger.errors import ConfigTooLargeError

    started = time.perf_counter()
    with pytest.raises(ConfigTooLargeError, match=r"more than 262,145 bytes, over the 262,144-byte limit"):
        read_config_file("/dev/zero")  # st_size is 0: the size said is what was read, not "0 bytes"
    assert time.perf_counter() - started < 1
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * 300_000)
    with pytest.raises(ConfigTooLargeError, match=r"the config is 300,000 bytes, over"):
        read_config_file(big)
