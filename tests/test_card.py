"""merger.publish.card: front matter keys, license agreement, and the body's method link, models and YAML."""

from __future__ import annotations

import re

import pytest
import yaml
from huggingface_hub import ModelCard

from merger.publish.card import render_model_card

TIES_YAML = """\
# merged for the tests
merge_method: ties
base_model: org/base
models:
  - model: org/code@v2
    parameters: {density: 0.5, weight: 0.7}
  - model: /models/local-prose
    parameters: {density: 0.5, weight: 0.3}
dtype: bfloat16
"""


def render(**overrides) -> str:
    arguments = dict(
        title="alice/ties-merge",
        yaml_text=TIES_YAML,
        method_name="TIES",
        method_url="https://arxiv.org/abs/2306.01708",
        base_model="org/base",
        models=["org/base", "org/code@v2", "/models/local-prose", "org/code@v2"],
        licenses=["apache-2.0", "apache-2.0", "apache-2.0", "apache-2.0"],
    )
    return render_model_card(**(arguments | overrides))


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the card must start with YAML front matter"
    return yaml.safe_load(match[1])


def body(card: str) -> str:
    return ModelCard(card).text


def test_front_matter_has_every_key():
    assert front_matter(render()) == {
        "base_model": ["org/base", "org/code"],  # Hub ids in config order, revision and local path dropped
        "base_model_relation": "merge",
        "tags": ["merge", "mergekit"],
        "library_name": "transformers",
        "license": "apache-2.0",
    }


def test_front_matter_parses_with_huggingface_hub():
    data = ModelCard(render()).data
    assert data.base_model == ["org/base", "org/code"]
    assert data.license == "apache-2.0"
    assert data.tags == ["merge", "mergekit"]


def test_all_local_models_leave_base_model_out():
    card = render(base_model=None, models=["/a", "./b"], licenses=["mit", "mit"])
    assert "base_model" not in front_matter(card)
    assert "* `/a`\n* `./b`" in body(card)


@pytest.mark.parametrize(
    ("licenses", "expected"),
    [
        (["mit", "mit", "mit", "mit"], "mit"),
        (["apache-2.0", "mit", "apache-2.0", "mit"], "other"),
        (["apache-2.0", None, "apache-2.0", None], "other"),
        ([None, None, None, None], "other"),
    ],
)
def test_license_is_shared_license_else_other(licenses, expected):
    assert front_matter(render(licenses=licenses))["license"] == expected


def test_license_note_lists_each_parent_when_licenses_differ():
    text = body(render(licenses=["apache-2.0", "mit", None, "ignored: duplicate reference"]))

    assert "licenses differ or are unknown" in text
    assert "check each parent's terms" in text.lower()
    assert "> - org/base: apache-2.0\n> - org/code@v2: mit\n> - /models/local-prose: unknown\n" in text


def test_no_license_note_when_parents_agree():
    assert "licenses differ" not in body(render())


def test_body_heading_method_link_and_base():
    text = body(render())

    assert text.lstrip().startswith("# alice/ties-merge\n")
    assert "mergekit" in text and "merger" in text
    assert "## Merge Details" in text and "### Merge Method" in text
    assert (
        "merged using the [TIES](https://arxiv.org/abs/2306.01708) merge method using "
        "[org/base](https://huggingface.co/org/base) as a base." in text
    )


def test_base_is_not_mentioned_when_told_not_to():
    text = body(render(mention_base=False))
    assert "merged using the [TIES](https://arxiv.org/abs/2306.01708) merge method.\n" in text
    assert "as a base" not in text


def test_models_merged_lists_sources_once_in_order_with_links():
    text = body(render())
    section = text.split("### Models Merged")[1].split("###")[0]
    bullets = [line for line in section.splitlines() if line.startswith("* ")]

    assert bullets == [
        "* [org/base](https://huggingface.co/org/base)",
        "* [org/code@v2](https://huggingface.co/org/code/tree/v2)",
        "* `/models/local-prose`",
    ]


def test_configuration_is_the_verbatim_yaml():
    section = body(render()).split("### Configuration\n")[1]
    assert f"```yaml\n{TIES_YAML}```\n" in section


def test_usage_snippet_loads_the_title():
    text = body(render())
    assert "## Usage" in text
    assert 'AutoTokenizer.from_pretrained("alice/ties-merge")' in text
    assert 'AutoModelForCausalLM.from_pretrained("alice/ties-merge")' in text
    assert "model.generate(" in text


def test_moe_card_warns_about_the_random_router():
    card = render(moe=True)
    assert "Mixture of Experts" in body(card)
    assert "randomly initialised" in body(card) and "fine-tuned" in body(card)
    assert front_matter(card)["tags"] == ["merge", "mergekit", "moe"]
    assert "Mixture of Experts" not in body(render())


def test_models_and_licenses_must_be_parallel():
    with pytest.raises(ValueError):
        render(licenses=["mit"])


def test_names_licenses_and_yaml_from_users_stay_text():
    hostile = "/models/x`](javascript:alert(1)) <img src=x>"
    yaml_text = TIES_YAML + "# a comment that closes a fence:\n# ```\n# ````\n"
    card = render(
        title="local `merge` *bold*",
        yaml_text=yaml_text,
        models=["org/base", hostile],
        licenses=["apache-2.0", "[click](http://evil) <b>x</b>"],
    )
    text = body(card)
    assert "# local \\`merge\\` \\*bold\\*" in text
    assert 'from_pretrained("local `merge` *bold*")' in text  # the snippet is Python: a string literal
    assert "``/models/x`](javascript:alert(1)) <img src=x>``" in text  # a code span its backtick cannot close
    assert "\\[click\\](http://evil) \\<b\\>x\\</b\\>" in text
    # the YAML block's fence is longer than any backtick run in the YAML, so the YAML is one block, verbatim
    assert "`````yaml\n" + yaml_text.rstrip("\n") + "\n`````\n" in text
