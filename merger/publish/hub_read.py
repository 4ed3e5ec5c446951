"""Reading from the Hugging Face Hub: model metadata (config and safetensors headers by byte ranges,
no weights), downloads of weights, tokenizers and adapters, and the model search.

All calls go through huggingface_hub, so HF_ENDPOINT, HF_TOKEN and HF_HOME apply as usual. Its
exceptions never escape: they become :class:`~merger.errors.ModelNotFoundError`,
:class:`~merger.errors.UnsafeWeightsError` or :class:`~merger.errors.HubError`
(:mod:`merger.publish.hub_calls`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2  # huggingface_hub's HTTP client: its transport errors are what a dead network raises
import yaml
from huggingface_hub import hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from merger.constants import CONFIG_FILE, HUB_ALLOW_PATTERNS, SAFETENSORS_INDEX_FILE, TOKENIZER_FILES
from merger.errors import (
    LoraAdapterError,
    ModelNotFoundError,
    TruncatedWeightsError,
    WeightIndexError,
    excerpt,
)
from merger.io.formats import refuse_non_checkpoint_files
from merger.io.metadata import HubCheckpoint, ModelMetadata, StoredTensor, TensorMeta, read_model_config
from merger.io.modelfiles import (
    TensorEntry,
    check_header,
    check_index_matches,
    header_length,
    parse_header,
    parse_weight_map,
    read_bytes,
)
from merger.config.references import split_reference
from merger.publish.hub_calls import hub_call

if TYPE_CHECKING:
    from huggingface_hub import HfApi, ModelInfo

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE_FILE = "model.safetensors"
HEADER_FIRST_READ = 100_000  # bytes of a shard fetched first: most headers fit, as huggingface_hub assumes
HUB_TIMEOUT = 10  # seconds to wait for the Hub to send data


def _api(token: str | None) -> HfApi:
    """huggingface_hub's client, imported at the first Hub call: its module takes a quarter of a second
    to import, which a merge of local folders (the command line's usual case) never needs to pay."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def download_model(reference: str, token: str | None = None, weights: bool = True) -> Path:
    """Download a Hub model's safetensors weights, configs and tokenizer files into the HF cache.

    The repo's file list is checked first, so that a pickle-only model is refused before any byte
    of it is fetched. Files come from one commit: the head of the revision when the call starts.

    Args:
        reference (`str`): `"org/name"` or `"org/name@revision"`.
        token (`str`, *optional*): a Hugging Face token; defaults to HF_TOKEN or the saved login.
        weights (`bool`, *optional*): also the `*.safetensors` weights; without them, every other file
            (the weights are then read by byte ranges: :mod:`merger.publish.hub_ranges`).

    Returns:
        `Path`: the local snapshot directory.

    Raises:
        [`~merger.errors.ModelNotFoundError`]: the repo or revision does not exist or is not visible.
        [`~merger.errors.UnsafeWeightsError`]: the repo has only pickle weights (`.bin`, `.pt`, ...).
        [`~merger.errors.AdapterModelError`], [`~merger.errors.GgufOnlyError`]: a PEFT adapter or GGUF-only repo.
        [`~merger.errors.HubError`]: the token was rejected, or the Hub could not be reached.
    """
    repo_id, revision = split_reference(reference)
    api = _api(token)
    with reading_model(reference, token):
        info = api.model_info(repo_id, revision=revision)
        _refuse_non_checkpoint(api, reference, info)
        patterns = HUB_ALLOW_PATTERNS if weights else [p for p in HUB_ALLOW_PATTERNS if p != "*.safetensors"]
        return Path(api.snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns))


def download_tokenizer(reference: str, token: str | None = None) -> Path:
    """Download only a Hub model's tokenizer files and configs (no weights), for vocabulary planning.

    Args:
        reference (`str`): `"org/name"` or `"org/name@revision"`.
        token (`str`, *optional*): a Hugging Face token; defaults to HF_TOKEN or the saved login.

    Returns:
        `Path`: the local snapshot directory holding the tokenizer files that exist.

    Raises:
        [`~merger.errors.ModelNotFoundError`], [`~merger.errors.HubError`]: as :func:`download_model`.
    """
    repo_id, revision = split_reference(reference)
    api = _api(token)
    with reading_model(reference, token):
        info = api.model_info(repo_id, revision=revision)
        patterns = [CONFIG_FILE, *TOKENIZER_FILES]
        return Path(api.snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns))


ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
MAX_ADAPTER_BYTES = 8 * 2**30  # a rank-256 adapter of a 70B model is about 6 GB


def download_adapter(reference: str, token: str | None = None) -> Path:
    """Download a Hub LoRA adapter's `adapter_config.json` and `adapter_model.safetensors` only.

    Args:
        reference (`str`): `"org/name"` or `"org/name@revision"`.
        token (`str`, *optional*): a Hugging Face token; defaults to HF_TOKEN or the saved login.

    Returns:
        `Path`: the local snapshot directory (its files are checked by :mod:`merger.lora.adapter`).

    Raises:
        [`~merger.errors.ModelNotFoundError`], [`~merger.errors.HubError`]: as :func:`download_model`.
        [`~merger.errors.LoraAdapterError`]: the adapter's weights are over 8 GB.
    """
    repo_id, revision = split_reference(reference)
    api = _api(token)
    with reading_model(reference, token):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        size = sum(s.size or 0 for s in info.siblings or [] if s.rfilename in ADAPTER_FILES)
        if size > MAX_ADAPTER_BYTES:
            raise LoraAdapterError(f"LoRA `{reference}`: its files are {size / 2**30:.1f} GB, over the "
                                   f"{MAX_ADAPTER_BYTES // 2**30} GB limit for an adapter")
        return Path(api.snapshot_download(repo_id, revision=info.sha, allow_patterns=ADAPTER_FILES))


def fetch_metadata(reference: str, token: str | None = None) -> ModelMetadata:
    """Read a Hub model's config, tensor shapes/dtypes and license without downloading its weights.

    Only `config.json` and the safetensors headers (a byte range of each shard) are fetched.

    Args:
        reference (`str`): `"org/name"` or `"org/name@revision"`.
        token (`str`, *optional*): a Hugging Face token; defaults to HF_TOKEN or the saved login.

    Returns:
        [`~merger.io.metadata.ModelMetadata`]: config, tensors over all shards, and the card's license
        (`None` when the card has none).

    Raises:
        [`~merger.errors.ModelNotFoundError`]: the repo or revision does not exist or is not visible,
            or it has no `config.json` or no `model.safetensors` / `model.safetensors.index.json`.
        [`~merger.errors.UnsafeWeightsError`]: the repo has only pickle weights.
        [`~merger.errors.ModelFileError`] subclasses: a PEFT adapter or GGUF-only repo; a broken
            `config.json`, index or safetensors header (see :mod:`merger.io.modelfiles`).
        [`~merger.errors.HubError`]: the token was rejected, or the Hub could not be reached.
    """
    repo_id, revision = split_reference(reference)
    api = _api(token)
    with reading_model(reference, token):
        info = api.model_info(repo_id, revision=revision)
        _refuse_non_checkpoint(api, reference, info)
        config = _remote_config(api, reference, repo_id, info.sha)
        files, sizes = _remote_tensors(api, reference, info)
        card_license = _card_license(api, info)
    tensors = {name: stored.meta for layout in files.values() for name, stored in layout.items()}
    names = [sibling.rfilename for sibling in info.siblings or []]
    # Without an index, a local folder's every `*.safetensors` is weights (merger.io.metadata.read_checkpoint),
    # and a tensor in two of them is refused; ranges would read `model.safetensors` alone and never see the
    # other files, so such a repo gets no checkpoint: it is downloaded and checked whole.
    stray = SAFETENSORS_INDEX_FILE not in names and any(
        n.endswith(".safetensors") and "/" not in n and n != SAFETENSORS_SINGLE_FILE for n in names
    )
    hub = None if stray else HubCheckpoint(info.id, info.sha, files, sizes)
    return ModelMetadata(reference, config, tensors, card_license, hub)


@dataclass(frozen=True)
class RepoAccess:
    """What a Hub repo's info says about reading it (no file is downloaded, except a README's first bytes).

    Attributes:
        gated: `"auto"` or `"manual"` when users must accept the repo's terms first; None when not gated.
        private: the repo is private (visible only to its owner and their organisations).
        license: the card's `license` (None when the card states none).
    """

    gated: str | None
    private: bool
    license: str | None


def repo_access(reference: str, token: str | None = None) -> RepoAccess:
    """A Hub model's gated state, visibility and license, from its repo info (a gated repo answers this
    even to a user who has not accepted its terms).

    Args:
        reference (`str`): `"org/name"` or `"org/name@revision"`.
        token (`str`, *optional*): a Hugging Face token; defaults to HF_TOKEN or the saved login.

    Raises:
        [`~merger.errors.ModelNotFoundError`], [`~merger.errors.HubError`]: as :func:`fetch_metadata`.
    """
    repo_id, revision = split_reference(reference)
    api = _api(token)
    with reading_model(reference, token):
        info = api.model_info(repo_id, revision=revision)
        return RepoAccess(info.gated or None, bool(info.private), _card_license(api, info))


README_FILE = "README.md"
README_FIRST_READ = 64_000  # bytes of a README read for its front matter (cards put it first)


def _card_license(api: HfApi, info: ModelInfo) -> str | None:
    """The model card's `license`: the Hub's parsed card data, or, when the answer carries none, the
    front matter at the top of the repo's README (its first bytes only)."""
    if info.card_data is not None:
        found = info.card_data.license
    elif README_FILE in {sibling.rfilename for sibling in info.siblings or []}:
        head = _byte_range(api, info, README_FILE, 0, README_FIRST_READ - 1)
        from huggingface_hub import ModelCard  # with the client (see _api)

        try:
            found = ModelCard(head.decode("utf-8", errors="replace"), ignore_metadata_errors=True).data.license
        except (ValueError, yaml.YAMLError):  # front matter that is not a YAML mapping: no license, as without a card
            logger.warning("model `%s`: the README's front matter is unreadable; its license is unknown", info.id)
            found = None
    else:
        found = None
    return found if isinstance(found, str) and found else None


def search_models(query: str, token: str | None = None, limit: int = 20) -> list[str]:
    """Model ids whose name contains `query`, for a type-ahead box.

    Args:
        query (`str`): the text typed so far; blank gives no results.
        token (`str`, *optional*): a Hugging Face token, so that the user's private repos match too.
        limit (`int`, *optional*, defaults to 20): the most ids to return.

    Returns:
        `list[str]`: repo ids in the Hub's order; empty when the Hub cannot be reached, because a
        suggestion list must never break the form it sits in.
    """
    if not query.strip():
        return []
    try:
        return [model.id for model in _api(token).list_models(search=query.strip(), limit=limit)]
    except (httpx2.HTTPError, OSError) as err:
        logger.warning("model search failed (%s); showing no suggestions", type(err).__name__)
        return []


def _refuse_non_checkpoint(api: HfApi, reference: str, info: ModelInfo) -> None:
    """Refuse a PEFT adapter, GGUF-only or pickle-only repo from its file list."""
    names = [sibling.rfilename for sibling in info.siblings or []]

    def read(name: str) -> bytes:
        return read_bytes(Path(api.hf_hub_download(info.id, name, revision=info.sha)))

    refuse_non_checkpoint_files(reference, names, read)


def _remote_config(api: HfApi, reference: str, repo_id: str, revision: str) -> dict:
    try:
        path = api.hf_hub_download(repo_id, CONFIG_FILE, revision=revision)
    except RemoteEntryNotFoundError:
        raise ModelNotFoundError(
            f"model `{reference}` has no `{CONFIG_FILE}` on the Hub; merger needs a transformers model repo."
        ) from None
    return read_model_config(read_bytes(Path(path)), reference)


def _remote_tensors(
    api: HfApi, reference: str, info: ModelInfo
) -> tuple[dict[str, dict[str, StoredTensor]], dict[str, int]]:
    """Every tensor's shape, dtype and byte range (file name -> tensor name -> stored tensor) from the repo's
    safetensors headers, each checked as a local one's is (:mod:`merger.io.modelfiles`), except against the
    file's size, and the files' sizes the Hub gave (checked when the weights are read: validation reads
    headers only)."""
    names = {sibling.rfilename for sibling in info.siblings or []}
    where = f"model `{reference}`"
    index_where = f"{where}: `{SAFETENSORS_INDEX_FILE}`"
    weight_map = None
    if SAFETENSORS_INDEX_FILE in names:
        index = api.hf_hub_download(info.id, SAFETENSORS_INDEX_FILE, revision=info.sha)
        weight_map = parse_weight_map(read_bytes(Path(index)), index_where)
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if name not in names]
        if missing:
            raise WeightIndexError(f"{index_where} names shard `{excerpt(missing[0])}`, which is not in the repo")
    elif SAFETENSORS_SINGLE_FILE in names:
        files = [SAFETENSORS_SINGLE_FILE]
    else:
        raise ModelNotFoundError(
            f"model `{reference}` has neither `{SAFETENSORS_SINGLE_FILE}` nor `{SAFETENSORS_INDEX_FILE}`; "
            "use a revision that ships safetensors weights under those names."
        )
    with ThreadPoolExecutor(max_workers=8) as threads:
        headers = dict(zip(files, threads.map(lambda name: _remote_header(api, info, name, f"{where}: `{name}`"), files)))
    if weight_map is not None:
        check_index_matches(weight_map, {name: set(entries) for name, (_, entries, _) in headers.items()}, index_where)
    files = {
        file: {
            name: StoredTensor(TensorMeta(shape, dtype), start + begin, end - begin)
            for name, (shape, dtype, begin, end) in entries.items()
        }
        for file, (start, entries, _) in headers.items()
    }
    return files, {file: size for file, (_, _, size) in headers.items() if size is not None}


def _remote_header(api: HfApi, info: ModelInfo, filename: str, where: str) -> tuple[int, dict[str, TensorEntry], int | None]:
    """One Hub file's safetensors header, read by byte ranges (as huggingface_hub's own parser does) and checked;
    returns the offset of its data section, its entries (offsets relative to that section) and the file's size
    (from the first answer's Content-Range; None if the Hub did not say)."""
    sizes: list[int] = []
    head = _byte_range(api, info, filename, 0, HEADER_FIRST_READ - 1, sizes)
    length = header_length(head, None, where)
    data = head[8 : 8 + length] if len(head) >= 8 + length else _byte_range(api, info, filename, 8, 8 + length - 1)
    if len(data) < length:
        raise TruncatedWeightsError(f"{where} ends inside its safetensors header; the file on the Hub is incomplete")
    size = sizes[0] if sizes and sizes[0] >= 0 else None
    return 8 + length, check_header(parse_header(data, where), where, None), size


def _byte_range(api: HfApi, info: ModelInfo, filename: str, first: int, last: int,
                sizes: list[int] | None = None) -> bytes:
    """Bytes `first`..`last` (inclusive) of one file of the repo at `info.sha`; fewer where the file ends.
    With `sizes`, the file's whole size is appended to it (from Content-Range; -1 when the Hub did not say)."""
    url = hf_hub_url(info.id, filename, revision=info.sha, endpoint=api.endpoint)
    headers = {**build_hf_headers(token=api.token), "range": f"bytes={first}-{last}"}
    response = get_session().get(url, headers=headers, timeout=HUB_TIMEOUT)
    if response.status_code == 416:  # Range Not Satisfiable: the file ends before `first` (a 0-byte file)
        return b""
    hf_raise_for_status(response)
    if sizes is not None:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        sizes.append(int(total) if total.isdigit() else len(response.content) if response.status_code == 200 else -1)
    return response.content


@contextmanager
def reading_model(reference: str, token: str | None) -> Iterator[None]:
    """Around Hub calls that read model `reference`: a missing, hidden or gated repo becomes
    ModelNotFoundError (saying what to do), any other Hub or network failure HubError."""
    with hub_call(f"reading model `{excerpt(reference, 100)}`", token):
        try:
            yield
        except GatedRepoError:  # a RepositoryNotFoundError too: test it first
            raise ModelNotFoundError(
                f"model `{reference}` is gated: accept its terms on its Hub page, then sign in (or set HF_TOKEN)."
            ) from None
        except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
            raise ModelNotFoundError(
                f"model `{reference}` was not found on the Hub; check the spelling and the revision after `@`, "
                "or, if the repo is private or gated, sign in with an account that can see it."
            ) from None
