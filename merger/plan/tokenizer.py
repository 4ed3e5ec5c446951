"""Output vocabulary and embedding alignment for `tokenizer_source` / `tokenizer:`.

When models use different tokenizers, row `i` of one embedding matrix and row `i` of another mean
different tokens. The output vocabulary is chosen (`base`, `union` or one model's), then each model's
embedding (and lm_head) rows are permuted onto it before the merge method runs, so a token shared by
several models is merged from their own rows. A token a model lacks takes the default row: the
base's if the base has it, else the mean of the models that have it, else zeros; `tokenizer.tokens`
overrides the default per token (`force: true` applies it to every model). Padding rows added by
`pad_to_multiple_of` are each model's mean row.

Deterministic: new tokens are appended in config order (base first), never in set order.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from merger.config.chat_template import chat_template_text
from merger.config.schema import ModelReference
from merger.errors import ConfigError, excerpt


@dataclass(frozen=True)
class Vocabulary:
    """A model's tokenizer vocabulary, as far as planning needs it.

    Attributes:
        ids: token string -> id, added tokens included.
        added: added tokens (id -> (content, special)), in id order.
        rows: rows of the model's embedding matrix (ids at or past it have no row).
        chat_template: the tokenizer_config's chat template, if any.
    """

    ids: dict[str, int] = field(repr=False)
    added: tuple[tuple[int, str, bool], ...]
    rows: int
    chat_template: str | None = None

    @property
    def size(self) -> int:
        """One past the largest token id."""
        return max(self.ids.values(), default=-1) + 1


def load_vocabulary(model_dir: Path, rows: int, reference: str) -> Vocabulary:
    """Read a model directory's tokenizer (`tokenizer.json` via `tokenizers`, else transformers).

    Args:
        model_dir: a directory with tokenizer files.
        rows: the model's embedding rows.
        reference: the model as its config names it (errors say this, never the folder: a Hub model's
            folder is the server's cache).

    Raises:
        ConfigError: the directory has no loadable tokenizer, or its tokenizer files are broken.
    """
    try:
        return _read_vocabulary(model_dir, rows)
    except Exception as err:  # json, tokenizers and transformers raise many types for broken files
        raise ConfigError(f"model `{excerpt(reference)}` has no tokenizer merger can read ({type(err).__name__}); "
                          "set `tokenizer_source` to a model that has one") from None


def _read_vocabulary(model_dir: Path, rows: int) -> Vocabulary:
    config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = tokenizer_config.get("chat_template")
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        ids = tokenizer.get_vocab(with_added_tokens=True)
        added = tuple((i, t.content, t.special) for i, t in sorted(tokenizer.get_added_tokens_decoder().items()))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = tokenizer.get_vocab()
        added = tuple((i, t.content, t.special) for i, t in sorted(tokenizer.added_tokens_decoder.items()))
    return Vocabulary(ids, added, rows, template if isinstance(template, str) else None)


@dataclass(frozen=True)
class TokenOverride:
    """Where the default row of one output token comes from (`tokenizer.tokens` entry).

    Attributes:
        model: the model key whose row is used, or None for a zero row.
        row: that model's row index.
        force: use the default for every model, even those that have the token.
    """

    model: str | None
    row: int
    force: bool


class NewToken(NamedTuple):
    """A token the output tokenizer gains.

    Attributes:
        content: the token string, as the vocabulary spells it (byte-level BPE: `Ġword`).
        special: an added token marked special (skipped when decoding).
        added: an added token, matched in raw text before the model tokenises (a model's own added
            tokens, `tokenizer.tokens` entries); False for another model's ordinary vocabulary token,
            which enters the donor's model vocabulary so the donor's text tokenises as before.
    """

    content: str
    special: bool
    added: bool


@dataclass(frozen=True)
class VocabPlan:
    """The output vocabulary and, per model, where each output row comes from.

    Attributes:
        donor: key of the model whose tokenizer files the output starts from.
        new_tokens: tokens appended to the donor's tokenizer, in id order.
        first_new_id: the id of the first new token (the donor tokenizer's size).
        vocab_size: output token ids (before padding).
        rows: output embedding rows (`vocab_size` padded to `pad_to_multiple_of`).
        index: model key -> tensor `(vocab_size,)` int64 of source rows, -1 where the model lacks the token.
        base: the base model's key, whose row is the default where it has the token.
        overrides: output id -> :class:`TokenOverride`.
        identity: every model already has exactly the output layout (alignment is a no-op).
        chat_template: the template to write, or None to keep the donor's files verbatim.
        warnings: problems that do not stop the merge (a chat template's tokens the output lacks).
    """

    donor: str
    new_tokens: tuple[NewToken, ...]
    first_new_id: int
    vocab_size: int
    rows: int
    index: dict[str, torch.Tensor] = field(repr=False)
    base: str | None
    overrides: dict[int, TokenOverride]
    identity: bool
    chat_template: str | None
    warnings: tuple[str, ...] = ()

    @property
    def rewrites_tokenizer(self) -> bool:
        """Whether the tokenizer must be re-saved (new tokens or a chat template) rather than copied."""
        return bool(self.new_tokens) or self.chat_template is not None


def plan_vocabulary(
    choice: str,
    vocabs: dict[str, Vocabulary],
    order: list[str],
    base: str | None,
    tokens: dict[str, Any] | None = None,
    pad_to_multiple_of: int | None = None,
    chat_template: str | None = None,
) -> VocabPlan:
    """Choose the output vocabulary and map every model's rows onto it.

    Args:
        choice: `base`, `union`, or a model reference (that model's tokenizer).
        vocabs: model key -> :class:`Vocabulary`, for every model.
        order: model keys in config order (decides new token ids).
        base: the base model's key (else the first model's is the `base` vocabulary).
        tokens: the config's `tokenizer.tokens` overrides.
        pad_to_multiple_of: round the output rows up to a multiple of this.
        chat_template: the config's `chat_template` (`auto`, a built-in name, or Jinja).

    Raises:
        ConfigError: an unknown model in `tokenizer_source` or `tokens`, a token a `source` model
            lacks, or an unknown chat template name.
    """
    first = base or order[0]
    if choice in ("base", "union"):
        donor = first
    else:
        donor = ModelReference.parse(choice).key
        if donor not in vocabs:
            raise ConfigError(f"`tokenizer_source: {excerpt(choice)}` is not one of the merged models; use `base`, `union` "
                              f"or one of: {', '.join(order)}")
    donor_vocab = vocabs[donor]
    new_tokens, token_of = _new_tokens(choice, vocabs, order, donor, tokens)
    vocab_size = max(donor_vocab.size + len(new_tokens), donor_vocab.rows)
    rows = vocab_size if not pad_to_multiple_of else -(-vocab_size // pad_to_multiple_of) * pad_to_multiple_of
    index = _row_index(vocabs, order, donor, token_of, vocab_size)
    identity = rows == vocab_size and all(
        vocabs[key].rows == vocab_size and bool((index[key] == torch.arange(vocab_size)).all()) for key in order
    )
    overrides = _overrides(tokens or {}, vocabs, order, donor_vocab, token_of)
    template = resolve_chat_template(chat_template, [vocabs[k] for k in order])
    missing = template_tokens_missing(template, set(donor_vocab.ids) | {t.content for t in new_tokens})
    return VocabPlan(
        donor=donor,
        new_tokens=tuple(new_tokens),
        first_new_id=donor_vocab.size,
        vocab_size=vocab_size,
        rows=rows,
        index=index,
        base=base,
        overrides=overrides,
        identity=identity and not overrides,
        chat_template=template,
        warnings=(f"the chat template (`chat_template: {_short(chat_template)}`) writes "
                  f"{', '.join(f'`{t}`' for t in missing)}, which the output tokenizer lacks: each would be "
                  "split into ordinary tokens the model never saw in that role. Use a template of the "
                  "output tokenizer's family, or add them under `tokenizer: {tokens: ...}`",) if missing else (),
    )


def _new_tokens(
    choice: str, vocabs: dict[str, Vocabulary], order: list[str], donor: str, tokens: dict[str, Any] | None
) -> tuple[list[NewToken], dict[int, str]]:
    """The tokens the output adds to the donor's (the other models' for `union`, then `tokens`), and
    the output's id -> token map (the donor's ids, then the new ones in order)."""
    donor_vocab = vocabs[donor]
    token_of: dict[int, str] = {i: t for t, i in donor_vocab.ids.items()}
    new_tokens: list[NewToken] = []
    next_id = donor_vocab.size

    def append(token: str, special: bool, added: bool) -> None:
        nonlocal next_id
        if token not in donor_vocab.ids and token not in {t.content for t in new_tokens}:
            new_tokens.append(NewToken(token, special, added))
            token_of[next_id] = token
            next_id += 1

    if choice == "union":
        added = {content for key in order for _, content, _ in vocabs[key].added}
        for key in [donor] + [k for k in order if k != donor]:
            vocab = vocabs[key]
            for token, i in sorted(vocab.ids.items(), key=lambda item: item[1]):
                if i < vocab.rows and token not in added:
                    append(token, False, added=False)
        for key in [donor] + [k for k in order if k != donor]:
            for i, content, special in vocabs[key].added:
                if i < vocabs[key].rows:
                    append(content, special, added=True)
    for token in tokens or {}:
        append(token, False, added=True)
    return new_tokens, token_of


def _row_index(
    vocabs: dict[str, Vocabulary], order: list[str], donor: str, token_of: dict[int, str], vocab_size: int
) -> dict[str, torch.Tensor]:
    """Per model, int64 `(vocab_size,)`: the model's embedding row of each output token id, -1 where it has none."""
    donor_vocab = vocabs[donor]
    donor_own = {i for i in range(donor_vocab.rows) if i not in token_of or token_of[i] in donor_vocab.ids}
    index = {}
    for key in order:
        vocab = vocabs[key]
        if key == donor:
            rows_of = [i if i in donor_own else -1 for i in range(vocab_size)]
        else:
            rows_of = []
            for i in range(vocab_size):
                j = vocab.ids.get(token_of.get(i, ""), -1) if i in token_of else -1
                rows_of.append(j if j < vocab.rows else -1)
        index[key] = torch.tensor(rows_of, dtype=torch.long)
    return index


# Control tokens chat templates write literally: ChatML / Llama-3 / Phi `<|...|>`, Gemma's turn markers.
TEMPLATE_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>|<(?:start|end)_of_turn>")


def template_tokens_missing(template: str | None, vocabulary: set[str]) -> list[str]:
    """The control tokens a chat template writes literally that are not single tokens of `vocabulary`.

    Args:
        template: Jinja text, or None.
        vocabulary: every token string of the output tokenizer (model vocabulary and added tokens).

    Returns:
        The missing tokens, in order of first appearance.
    """
    found = dict.fromkeys(TEMPLATE_TOKEN.findall(template or ""))
    return [token for token in found if token not in vocabulary]


def _short(setting: str | None) -> str:
    text = " ".join((setting or "").split())
    return text if len(text) <= 30 else text[:27] + "..."


def _overrides(tokens: dict[str, Any], vocabs: dict[str, Vocabulary], order: list[str],
               donor: Vocabulary, token_of: dict[int, str]) -> dict[int, TokenOverride]:
    out_id = {t: i for i, t in token_of.items()}
    result = {}
    for token, spec in tokens.items():
        where = f"`tokenizer.tokens.{excerpt(token)}`"
        spec = spec if isinstance(spec, dict) else {"source": spec}
        source, force = spec.get("source"), bool(spec.get("force", False))
        if isinstance(source, dict) and source.get("kind") == "zero":
            result[out_id[token]] = TokenOverride(None, -1, force)
            continue
        if isinstance(source, dict) and source.get("kind") == "model_token":
            key = _model_key(source.get("model"), vocabs, where)
            row = source.get("token_id")
            if row is None:
                row = vocabs[key].ids.get(source.get("token"), -1)
        elif isinstance(source, str):
            key = _model_key(source, vocabs, where)
            row = vocabs[key].ids.get(token, -1)
        else:
            raise ConfigError(f"{where}.source must be a model, {{kind: model_token, model, token}} or {{kind: zero}}, "
                              f"got `{excerpt(source)}`")
        if not 0 <= row < vocabs[key].rows:
            raise ConfigError(f"{where}: model `{key}` has no row for that token; pick a model that has it or "
                              "use `{kind: zero}`")
        result[out_id[token]] = TokenOverride(key, row, force)
    return result


def _model_key(reference: Any, vocabs: dict[str, Vocabulary], where: str) -> str:
    key = ModelReference.parse(reference).key
    if key not in vocabs:
        raise ConfigError(f"{where} names `{excerpt(reference)}`, which is not one of the merged models; use one of: "
                          f"{', '.join(vocabs)}")
    return key


def resolve_chat_template(setting: str | None, vocabs: list[Vocabulary]) -> str | None:
    """`auto` -> the most common template among the inputs (first in config order on ties); a
    built-in name (`templates/chat_templates/<name>.jinja`) -> its text; literal Jinja -> itself.

    Raises:
        ChatTemplateError: not a built-in name, or Jinja that does not compile (see :mod:`merger.config.chat_template`).
    """
    if setting is None:
        return None
    if setting == "auto":
        templates = [v.chat_template for v in vocabs if v.chat_template]
        return Counter(templates).most_common(1)[0][0] if templates else None
    return chat_template_text(setting)


def align_embeddings(tensors: dict[str, torch.Tensor], plan: VocabPlan) -> dict[str, torch.Tensor]:
    """Permute each model's embedding rows onto the output vocabulary.

    Args:
        tensors: model key -> float32 embedding or lm_head `(rows_m, hidden)`.
        plan: the :class:`VocabPlan`.

    Returns:
        model key -> float32 `(plan.rows, hidden)`, rows aligned to output token ids.
    """
    if plan.identity:
        return tensors
    any_tensor = next(iter(tensors.values()))
    hidden, device = any_tensor.shape[1], any_tensor.device
    total = torch.zeros(plan.vocab_size, hidden, device=device)
    count = torch.zeros(plan.vocab_size, 1, device=device)
    gathered = {}
    for key, tensor in tensors.items():
        index = plan.index[key].to(device)
        present = (index >= 0) & (index < tensor.shape[0])
        rows = torch.zeros(plan.vocab_size, hidden, device=device)
        rows[present] = tensor[index[present]]
        gathered[key] = (rows, present)
        total += rows
        count += present.unsqueeze(1)
    default = total / count.clamp(min=1)  # mean over models that have the token; zero where none does
    if plan.base in gathered:
        base_rows, base_present = gathered[plan.base]
        default[base_present] = base_rows[base_present]
    forced = torch.zeros(plan.vocab_size, dtype=torch.bool, device=device)
    for token_id, override in plan.overrides.items():
        source = tensors.get(override.model) if override.model else None
        default[token_id] = source[override.row] if source is not None else 0
        forced[token_id] = override.force
    out = {}
    for key, (rows, present) in gathered.items():
        keep = present & ~forced
        aligned = torch.where(keep.unsqueeze(1), rows, default)
        if plan.rows > plan.vocab_size:  # padding rows: the model's mean real row
            pad = aligned.mean(dim=0, keepdim=True).expand(plan.rows - plan.vocab_size, hidden)
            aligned = torch.cat([aligned, pad])
        out[key] = aligned
    return out
