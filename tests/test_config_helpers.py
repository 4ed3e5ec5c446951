"""The small config helpers around the form: example configs and local-path references."""

from __future__ import annotations

from pathlib import Path

from merger.config.examples import load_examples
from merger.config.parse import parse_config_text
from merger.config.references import local_paths

V1 = "mistralai/Mistral-7B-Instruct-v0.1"
V2 = "mistralai/Mistral-7B-Instruct-v0.2"


def test_load_examples(tmp_path: Path) -> None:
    (tmp_path / "b-linear.yaml").write_text("# Two models averaged\n#\n# Half and half,\n#   weight by weight.\n"
                                            "merge_method: linear\n# not part of it\nmodels: [{model: a/b}]\n")
    (tmp_path / "a_slerp.yml").write_text("merge_method: slerp\n")
    (tmp_path / "0-offline.yaml").write_text("# On a folder\nmerge_method: linear\nmodels: [{model: ./here}]\n")
    (tmp_path / "notes.txt").write_text("ignored")
    examples = load_examples(tmp_path)
    assert [(e.name, e.title) for e in examples] == [  # Hub examples first, those on local folders last
        ("a_slerp", "A slerp"), ("b-linear", "Two models averaged"), ("0-offline", "On a folder")]
    assert [e.description for e in examples] == ["", "Half and half, weight by weight.", ""]
    assert examples[1].yaml_text.startswith("# Two models averaged")
    assert load_examples(tmp_path / "missing") == []


def test_local_paths() -> None:
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: ./models/a, layer_range: [0, 2]}}]
  - sources: [{{model: /data/b, layer_range: [0, 2]}}]
  - sources: [{{model: "{V1}@main", layer_range: [0, 2]}}]
  - sources: [{{model: ~/c, layer_range: [0, 2]}}]
  - sources: [{{model: "..\\\\d", layer_range: [0, 2]}}]
  - sources: [{{model: "{V2}+./adapter", layer_range: [0, 2]}}]
tokenizer_source: union
"""
    assert local_paths(parse_config_text(text)) == ["./models/a", "/data/b", "~/c", "..\\d", "./adapter"]
    moe = f"base_model: {V1}\nexperts: [{{source_model: tests/data/fixtures/mistral-code}}]\n"
    assert local_paths(parse_config_text(moe)) == ["tests/data/fixtures/mistral-code"]
    assert local_paths(parse_config_text(f"base_model: {V1}\nexperts: [{{source_model: {V2}}}]\n")) == []


def test_schema_mistakes_are_said_in_plain_words() -> None:
    """pydantic's own wording ("List should have at least 1 item after validation") never reaches people."""
    import pytest

    from merger.config.load import load_config
    from merger.errors import ConfigError

    cases = {
        "base_model: a/b\nexperts: []\n": "`experts` must list at least 1, got `[]`; add them",
        "merge_method: passthrough\nslices: [{sources: [{model: a/b, layer_range: x}]}]\n":
            "`slices[0].sources[0].layer_range` must be a list like `[0, 8]`, got `x`",
        "merge_method: linear\nmodels: a/b\n": "`models` must be a list (`- item` lines or `[a, b]`), got `a/b`",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_config(text)
        assert str(caught.value) == message


def test_a_revision_does_not_make_a_local_folder_a_hub_id(tmp_path: Path, monkeypatch) -> None:
    """`dir@main` reads the folder `dir`: a Space must see it as the local path it is."""
    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    text = ("merge_method: linear\nmodels:\n  - model: models/base@main\n  - model: org/a+models/base@r\n"
            "tokenizer_source: models/base@x\n")
    assert local_paths(parse_config_text(text)) == ["models/base@main", "models/base@r", "models/base@x"]
