"""Writing the output tokenizer: the donor's files, edited only where the config changes them.

The donor's tokenizer files are copied byte for byte; then, for new tokens or a chat template, only
the JSON that must change is parsed, edited and written back in the layout it came in (compact stays
compact, indented stays indented). transformers' `save_pretrained` is not used: it pretty-prints
`tokenizer.json` (2.5x larger with identical content), drops `special_tokens_map.json`, names a
tokenizer class older transformers cannot load, and writes the template only to
`chat_template.jinja`. Here:

- another model's ordinary vocabulary token (`union`) enters the donor's **model vocabulary** at its
  planned id, with no merges: BPE only ever produces tokens through its merges, so the donor's own
  text tokenises exactly as before (as an added token it would be cut out of every word containing
  it: "nation" would split at another vocabulary's "ation"). Models whose vocabulary is matched
  greedily or by score (WordPiece, Unigram) take them as added tokens instead; a warning is logged
  whenever a new token can be produced from text (those, a one-character BPE symbol, a BPE with
  `ignore_merges`, a WordLevel word the donor mapped to its unknown token).
- added tokens (a model's own, or `tokenizer.tokens` entries) go to `added_tokens` of
  `tokenizer.json` and `added_tokens_decoder` of `tokenizer_config.json`.
- the chat template goes to `tokenizer_config.json` (where transformers 4.x and most chat servers read
  it) and to `chat_template.jinja` (transformers 5), and `chat_template.json` when the donor has one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .constants import TOKENIZER_FILES
from .errors import ConfigError
from .tokenizer import NewToken, VocabPlan

logger = logging.getLogger(__name__)

# model types whose vocabulary can grow without changing how existing text tokenises
VOCAB_INSERTABLE = ("BPE", "WordLevel")
# transformers 5 class names that transformers 4.x cannot import, and the 4.x class for the same files
FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
V5_ONLY_CLASSES = ("TokenizersBackend",)


def write_tokenizer(plan: VocabPlan, donor_dir: Path, out_dir: Path) -> None:
    """Write the output tokenizer into `out_dir`: the donor's files plus the plan's tokens and template.

    Args:
        plan: the :class:`~merger.tokenizer.VocabPlan` (new tokens in id order from `first_new_id`).
        donor_dir: the donor model's folder.
        out_dir: the output folder.

    Raises:
        ConfigError: new tokens for a donor with no `tokenizer.json` that transformers cannot convert,
            or the written tokenizer gives a new token another id than planned (the donor's files
            disagree with its vocabulary).
    """
    for name in TOKENIZER_FILES:
        if (donor_dir / name).is_file():
            shutil.copyfile(donor_dir / name, out_dir / name)
    if plan.new_tokens:
        _add_tokens(plan, out_dir)
    if plan.chat_template is not None or (plan.new_tokens and (out_dir / "tokenizer_config.json").is_file()):
        _edit_tokenizer_config(plan, out_dir)
    if plan.chat_template is not None:
        (out_dir / "chat_template.jinja").write_text(plan.chat_template, encoding="utf-8")
        if (out_dir / "chat_template.json").is_file():
            _write_json_like(out_dir / "chat_template.json", {"chat_template": plan.chat_template})


def _add_tokens(plan: VocabPlan, out_dir: Path) -> None:
    """Add the plan's new tokens to `tokenizer.json` at their planned ids, then check the ids."""
    from tokenizers import Tokenizer

    path = out_dir / "tokenizer.json"
    if not path.is_file():  # vocabulary files only (vocab.json + merges.txt, tokenizer.model): convert
        _convert_to_tokenizer_json(out_dir)
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    in_model = model.get("type") in VOCAB_INSERTABLE
    reachable = []  # new tokens the donor's tokenizer can now produce from text
    for offset, token in enumerate(plan.new_tokens):
        token_id = plan.first_new_id + offset
        if not token.added and in_model:
            model["vocab"][token.content] = token_id
            # a BPE symbol is reached without a merge when it is one character, or a whole word under
            # `ignore_merges`; a WordLevel word was the unknown token before
            if model["type"] != "BPE" or len(token.content) == 1 or model.get("ignore_merges"):
                reachable.append(token.content)
            continue
        if not token.added:
            reachable.append(token.content)
        data["added_tokens"].append(_added_token_entry(token, token_id))
    if reachable:
        logger.warning(
            "%d new vocabulary token(s) of the other models (e.g. `%s`) can be produced from text by the donor's "
            "%s tokenizer, so text containing them tokenises differently from the donor", len(reachable),
            reachable[0], model.get("type"),
        )
    _write_json_like(path, data)
    written = Tokenizer.from_file(str(path))
    for offset, token in enumerate(plan.new_tokens):
        got = written.token_to_id(token.content)
        if got != plan.first_new_id + offset:
            raise ConfigError(f"the output tokenizer gave `{token.content}` id {got}, not "
                              f"{plan.first_new_id + offset}; choose another `tokenizer_source`")


def _convert_to_tokenizer_json(out_dir: Path) -> None:
    """Write `tokenizer.json` for a donor that ships only vocabulary files, from transformers' fast
    conversion of them (the files themselves stay as they were)."""
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(out_dir).backend_tokenizer
    except Exception as err:  # transformers raises many types for tokenizers it cannot convert
        raise ConfigError(f"the tokenizer donor has no `tokenizer.json` and transformers cannot build one "
                          f"({type(err).__name__}), so tokens cannot be added to it; choose a `tokenizer_source` "
                          "with a fast tokenizer (tokenizer.json)") from None
    (out_dir / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")


def _added_token_entry(token: NewToken, token_id: int) -> dict[str, Any]:
    """An `added_tokens` entry of tokenizer.json: special tokens match raw text, others normalised text."""
    return {"id": token_id, "content": token.content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not token.special, "special": token.special}


def _edit_tokenizer_config(plan: VocabPlan, out_dir: Path) -> None:
    """Set the chat template, add the new added tokens and name a class transformers 4.x can load (the
    donor's, unless it names none or a transformers-5-only one: then the generic fast tokenizer)."""
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    named = config.get("tokenizer_class")
    if (out_dir / "tokenizer.json").is_file() and (named is None or named in V5_ONLY_CLASSES):
        config["tokenizer_class"] = FAST_TOKENIZER_CLASS
    if plan.chat_template is not None:
        config["chat_template"] = plan.chat_template
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for offset, token in enumerate(plan.new_tokens):
            if token.added:
                entry = _added_token_entry(token, plan.first_new_id + offset)
                token_id = entry.pop("id")
                decoder[str(token_id)] = dict(sorted(entry.items()))
    _write_json_like(path, config)


def _write_json_like(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` in the layout of the file there (compact or 2-space indented, key order,
    final newline); a new file gets transformers' layout (indented, final newline)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    indented = old is None or "\n " in old[:200]
    old_keys = list(json.loads(old)) if old is not None else []
    if old_keys and old_keys == sorted(old_keys):  # transformers writes sorted keys: keep them sorted
        data = dict(sorted(data.items()))
    text = json.dumps(data, ensure_ascii=False, **({"indent": 2} if indented else {"separators": (",", ":")}))
    newline = "\n" if old is None or old.endswith("\n") else ""
    path.write_text(text + newline, encoding="utf-8")
