"""The merged model's card: front matter the Hub indexes, then how the model was made and how to use it.

Rendered from `templates/model_card.md` with huggingface_hub's `ModelCard.from_template` (Jinja).
Pure: no network calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from merger.config.references import looks_like_hub_id, split_reference

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "templates" / "model_card.md"
# Links point at huggingface.co whatever endpoint the card is pushed to: that is where cards are read.
HUB_WEB_URL = "https://huggingface.co"
TAGS = ["merge", "mergekit"]


# Characters that would start a link, an emphasis, code or HTML in a line of text; names and licenses come
# from users' configs and other people's cards, so they are shown as text, never as Markdown.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>|])")


@dataclass(frozen=True)
class _Source:
    """A parent model as the card shows it: its reference (Markdown-escaped text and a code span),
    its page (None if local), its license (escaped)."""

    name: str
    code: str
    url: str | None
    license: str | None = None


def render_model_card(
    *,
    title: str,
    yaml_text: str,
    method_name: str,
    method_url: str,
    base_model: str | None,
    models: list[str],
    licenses: list[str | None],
    moe: bool = False,
    prompt_routed: bool = False,
    mention_base: bool = True,
    remote_code: bool = False,
    multimodal: bool = False,
    evaluation: str | None = None,
) -> str:
    """Render the README.md of a merged model.

    Args:
        title (`str`): the model's name, usually its repo id; used as heading and in the usage snippet.
        yaml_text (`str`): the merge config exactly as the user wrote it; shown verbatim.
        method_name (`str`): the merge method's display name, e.g. `"TIES"`.
        method_url (`str`): the method's paper or documentation link.
        base_model (`str`, *optional*): the config's `base_model`, if any.
        models (`list[str]`): every source model in config order (the base may be among them).
            Repeats are dropped, keeping the first. References shaped like Hub ids (`org/name`, optional
            `@rev`) go into the front matter's `base_model`; local paths are only listed in the body.
        licenses (`list[str | None]`): each model's license, parallel to `models` (`None` = unknown).
        moe (`bool`, *optional*): the merge is a Mixture of Experts.
        prompt_routed (`bool`, *optional*): its routers were computed from the experts' prompts (else random).
        mention_base (`bool`, *optional*, defaults to `True`): say "using <base> as a base" (off for
            methods where the base plays no special role).
        remote_code (`bool`, *optional*): the model ships its own code (an `auto_map`), so loading it
            takes `trust_remote_code=True`; the card says so and the usage snippet passes it.
        multimodal (`bool`, *optional*): the model reads images too (a `text_config` / `vision_config`);
            the usage snippet loads it with `AutoModelForImageTextToText` and its processor.
        evaluation (`str`, *optional*): markdown of the merge's evaluation against its parents (the
            table of :meth:`merger.evaluate.score.EvalResult.table`), shown in an Evaluation section.

    Returns:
        `str`: the card, YAML front matter included.

    Raises:
        `ValueError`: `models` and `licenses` differ in length.
    """
    # imported here: huggingface_hub's card module brings its Hub client, a quarter of a second to
    # import, and the engine renders the card beside the merge (merger/engine.py), not before it
    from huggingface_hub import ModelCard, ModelCardData

    parents: dict[str, _Source] = {}
    for reference, license_ in zip(models, licenses, strict=True):
        parents.setdefault(reference, _source(reference, license_))
    agreed = _agreed_license([parent.license for parent in parents.values()])
    hub_ids = dict.fromkeys(split_reference(ref)[0] for ref, parent in parents.items() if parent.url)
    card_data = ModelCardData(
        base_model=list(hub_ids) or None,
        base_model_relation="merge",
        tags=TAGS + (["moe"] if moe else []),
        library_name="transformers",
        license=agreed or "other",
    )
    card = ModelCard.from_template(
        card_data,
        template_path=TEMPLATE_PATH,
        heading=markdown_text(title),
        repo_literal=json.dumps(title),  # a Python string literal in the usage snippet, whatever the name
        yaml_text=yaml_text.rstrip("\n"),
        yaml_fence=code_fence(yaml_text),  # the closing fence supplies the last line break
        method_name=method_name,
        method_url=method_url,
        base=_source(base_model, None) if base_model and mention_base else None,
        merged=list(parents.values()),
        license_parents=[] if agreed else list(parents.values()),
        moe=moe,
        prompt_routed=prompt_routed,
        remote_code=remote_code,
        multimodal=multimodal,
        evaluation=evaluation.rstrip("\n") if evaluation else None,
    )
    return str(card)


def _source(reference: str, license_: str | None) -> _Source:
    name, code = markdown_text(reference), code_span(reference)
    license_text = markdown_text(license_) if license_ else None
    if not looks_like_hub_id(reference):
        return _Source(name, code, None, license_text)
    repo_id, revision = split_reference(reference)
    url = f"{HUB_WEB_URL}/{repo_id}" + (f"/tree/{quote(revision, safe='')}" if revision else "")
    return _Source(name, code, url, license_text)


def markdown_text(text: str) -> str:
    """`text` on one line, shown literally in Markdown (link, emphasis, code and HTML characters escaped)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def code_span(text: str) -> str:
    """`text` on one line as an inline code span whose fence no backtick run inside can close."""
    text = " ".join(text.split())
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_fence(text: str) -> str:
    """A fence for a code block holding `text`: longer than any backtick run in it (CommonMark)."""
    return "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))


def _agreed_license(licenses: list[str | None]) -> str | None:
    """The one license every parent declares, or None if they differ or any is unknown."""
    distinct = set(licenses)
    return distinct.pop() if len(distinct) == 1 and None not in distinct else None
