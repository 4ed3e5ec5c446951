"""The merged model's card: front matter the Hub indexes, then how the model was made and how to use it.

Rendered from `templates/model_card.md` with huggingface_hub's `ModelCard.from_template` (Jinja).
Pure: no network calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .hub import looks_like_hub_id, split_reference

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "templates" / "model_card.md"
# Links point at huggingface.co whatever endpoint the card is pushed to: that is where cards are read.
HUB_WEB_URL = "https://huggingface.co"
TAGS = ["merge", "mergekit"]


@dataclass(frozen=True)
class _Source:
    """A parent model as the card shows it: its reference, its page (None if local), its license."""

    name: str
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
    mention_base: bool = True,
    remote_code: bool = False,
    multimodal: bool = False,
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
        moe (`bool`, *optional*): the merge is a Mixture of Experts with a freshly initialised router.
        mention_base (`bool`, *optional*, defaults to `True`): say "using <base> as a base" (off for
            methods where the base plays no special role).
        remote_code (`bool`, *optional*): the model ships its own code (an `auto_map`), so loading it
            takes `trust_remote_code=True`; the card says so and the usage snippet passes it.
        multimodal (`bool`, *optional*): the model reads images too (a `text_config` / `vision_config`);
            the usage snippet loads it with `AutoModelForImageTextToText` and its processor.

    Returns:
        `str`: the card, YAML front matter included.

    Raises:
        `ValueError`: `models` and `licenses` differ in length.
    """
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
        title=title,
        yaml_text=yaml_text.rstrip("\n"),  # the closing fence supplies the last line break
        method_name=method_name,
        method_url=method_url,
        base=_source(base_model, None) if base_model and mention_base else None,
        merged=list(parents.values()),
        license_parents=[] if agreed else list(parents.values()),
        moe=moe,
        remote_code=remote_code,
        multimodal=multimodal,
    )
    return str(card)


def _source(reference: str, license_: str | None) -> _Source:
    if not looks_like_hub_id(reference):
        return _Source(reference, None, license_)
    repo_id, revision = split_reference(reference)
    url = f"{HUB_WEB_URL}/{repo_id}" + (f"/tree/{revision}" if revision else "")
    return _Source(reference, url, license_)


def _agreed_license(licenses: list[str | None]) -> str | None:
    """The one license every parent declares, or None if they differ or any is unknown."""
    distinct = set(licenses)
    return distinct.pop() if len(distinct) == 1 and None not in distinct else None
