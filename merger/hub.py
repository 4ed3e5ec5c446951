"""Everything merger asks of the Hugging Face Hub, and nothing else talks to it.

All calls go through huggingface_hub, so HF_ENDPOINT, HF_TOKEN and HF_HOME apply as usual. Its
exceptions never escape: they become :class:`~merger.errors.ModelNotFoundError`,
:class:`~merger.errors.UnsafeWeightsError` or :class:`~merger.errors.HubError`, whose messages are
built here and scrubbed of tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its transport errors are what a dead network raises
from huggingface_hub import HfApi, ModelInfo, get_token, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, validate_repo_id

from .constants import CONFIG_FILE, HUB_ALLOW_PATTERNS, SAFETENSORS_INDEX_FILE, TOKENIZER_FILES
from .errors import (
    ConfigError,
    HubError,
    LoraAdapterError,
    MergerError,
    ModelNotFoundError,
    PushTargetError,
    TruncatedWeightsError,
    WeightIndexError,
    excerpt,
)
from .formats import refuse_non_checkpoint_files
from .metadata import ModelMetadata, TensorMeta, read_model_config
from .modelfiles import (
    TensorEntry,
    check_header,
    check_index_matches,
    header_length,
    parse_header,
    parse_weight_map,
    read_bytes,
)
from .tokens import scrub

logger = logging.getLogger(__name__)

_WRITE_ROLES = ("write", "admin")  # organization roles (whoami's `roleInOrg`) that may create and push repos

SAFETENSORS_SINGLE_FILE = "model.safetensors"
HEADER_FIRST_READ = 100_000  # bytes of a shard fetched first: most headers fit, as huggingface_hub assumes
HUB_TIMEOUT = 10  # seconds to wait for the Hub to send data


def split_reference(reference: str) -> tuple[str, str | None]:
    """Split a model reference into repo id and revision.

    Args:
        reference (`str`): `"org/name"` or `"org/name@revision"` (a branch, tag or commit sha).

    Returns:
        `tuple[str, str | None]`: the repo id and the revision (`None` when absent or empty).
    """
    repo_id, _, revision = reference.partition("@")
    return repo_id, revision or None


def looks_like_hub_id(reference: str) -> bool:
    """Whether `reference` has the shape of a Hub repo id (`name` or `org/name`, optional `@rev`).

    Pure: the local filesystem is not consulted (see :func:`is_hub_id` for that).

    Args:
        reference (`str`): a model reference from a config.

    Returns:
        `bool`: `True` when the part before `@` passes huggingface_hub's `validate_repo_id`.
    """
    try:
        validate_repo_id(split_reference(reference)[0])
    except HFValidationError:
        return False
    return True


def is_hub_id(reference: str) -> bool:
    """Whether `reference` names a Hub repo rather than a local model directory.

    Args:
        reference (`str`): a model reference from a config.

    Returns:
        `bool`: `True` when no local path of that name exists and it looks like a repo id
        (`name` or `org/name`, optional `@rev`).
    """
    return not Path(reference).expanduser().exists() and looks_like_hub_id(reference)


def download_model(reference: str, token: str | None = None) -> Path:
    """Download a Hub model's safetensors weights, configs and tokenizer files into the HF cache.

    The repo's file list is checked first, so that a pickle-only model is refused before any byte
    of it is fetched. Files come from one commit: the head of the revision when the call starts.

    Args:
        reference (`str`): `"org/name"` or `"org/name@revision"`.
        token (`str`, *optional*): a Hugging Face token; defaults to HF_TOKEN or the saved login.

    Returns:
        `Path`: the local snapshot directory.

    Raises:
        [`~merger.errors.ModelNotFoundError`]: the repo or revision does not exist or is not visible.
        [`~merger.errors.UnsafeWeightsError`]: the repo has only pickle weights (`.bin`, `.pt`, ...).
        [`~merger.errors.AdapterModelError`], [`~merger.errors.GgufOnlyError`]: a PEFT adapter or GGUF-only repo.
        [`~merger.errors.HubError`]: the token was rejected, or the Hub could not be reached.
    """
    repo_id, revision = split_reference(reference)
    api = HfApi(token=token)
    with _reading(reference, token):
        info = api.model_info(repo_id, revision=revision)
        _refuse_non_checkpoint(api, reference, info)
        return Path(api.snapshot_download(repo_id, revision=info.sha, allow_patterns=HUB_ALLOW_PATTERNS))


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
    api = HfApi(token=token)
    with _reading(reference, token):
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
    api = HfApi(token=token)
    with _reading(reference, token):
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
        [`~merger.metadata.ModelMetadata`]: config, tensors over all shards, and the card's license
        (`None` when the card has none).

    Raises:
        [`~merger.errors.ModelNotFoundError`]: the repo or revision does not exist or is not visible,
            or it has no `config.json` or no `model.safetensors` / `model.safetensors.index.json`.
        [`~merger.errors.UnsafeWeightsError`]: the repo has only pickle weights.
        [`~merger.errors.ModelFileError`] subclasses: a PEFT adapter or GGUF-only repo; a broken
            `config.json`, index or safetensors header (see :mod:`merger.modelfiles`).
        [`~merger.errors.HubError`]: the token was rejected, or the Hub could not be reached.
    """
    repo_id, revision = split_reference(reference)
    api = HfApi(token=token)
    with _reading(reference, token):
        info = api.model_info(repo_id, revision=revision)
        _refuse_non_checkpoint(api, reference, info)
        config = _remote_config(api, reference, repo_id, info.sha)
        tensors = _remote_tensors(api, reference, info)
    card_license = info.card_data.license if info.card_data else None
    return ModelMetadata(reference, config, tensors, card_license)


@dataclass(frozen=True)
class PushTarget:
    """A checked push target.

    Attributes:
        repo_id: the full id, `namespace/name`.
        exists: the repo exists already (and the user allowed reusing it).
        private: the repo's visibility after the push (an existing repo keeps its own).
    """

    repo_id: str
    exists: bool
    private: bool


def check_push_target(repo_id: str, token: str, private: bool = False, reuse_repo: bool = False) -> PushTarget:
    """Check, before any merge, that the token's user may push to `repo_id` as asked.

    The namespace must be the user's own or an organization where whoami gives them the `write` or
    `admin` role; an existing repo is used only with `reuse_repo`, and its visibility is never
    changed, so a private request for an existing public repo is refused.

    Args:
        repo_id (`str`): `"namespace/name"`, or a bare `"name"` for the token's own namespace.
        token (`str`): a Hugging Face token.
        private (`bool`, *optional*): the user asks for a private repo.
        reuse_repo (`bool`, *optional*): the user allows pushing a new commit to an existing repo.

    Returns:
        [`PushTarget`]: the full repo id, whether it exists, and its visibility after the push.

    Raises:
        [`~merger.errors.ConfigError`]: `repo_id` is not a valid repo id (field `repo`).
        [`~merger.errors.PushTargetError`]: no write access there, the repo exists without
            `reuse_repo`, or it is public and a private repo was asked for.
        [`~merger.errors.HubError`]: the token was rejected, or the Hub could not be reached.
    """
    check_repo_id(repo_id)
    api = HfApi(token=token)
    with _hub_call(f"checking the push target `{repo_id}`", token):
        me = api.whoami()
        namespace, _, name = repo_id.rpartition("/")
        full_id = f"{namespace or me['name']}/{name}"
        _check_write_access(me, full_id)
        try:
            info = api.repo_info(full_id)
        except RepositoryNotFoundError:
            return PushTarget(full_id, exists=False, private=private)
    _check_reuse(full_id, bool(info.private), private, reuse_repo)
    return PushTarget(full_id, exists=True, private=bool(info.private))


def push_folder(
    folder: Path,
    repo_id: str,
    token: str,
    private: bool = False,
    reuse_repo: bool = False,
    commit_message: str = "Upload merged model",
    before_create: Callable[[str], None] | None = None,
) -> str:
    """Upload a folder as one commit to a model repo, creating the repo if needed.

    The target is checked again first (:func:`check_push_target`): the Hub may have changed since
    the job was submitted. If the upload fails (or is interrupted) and this call created the repo,
    the repo is deleted; the error says exactly what is left on the Hub.

    Args:
        folder (`Path`): the directory to upload (all of it).
        repo_id (`str`): `"namespace/name"`, or a bare `"name"` for the token's own namespace.
        token (`str`): a Hugging Face token with write access to the namespace.
        private (`bool`, *optional*, defaults to `False`): create the repo as private.
        reuse_repo (`bool`, *optional*, defaults to `False`): push to the repo if it exists already.
        commit_message (`str`, *optional*): the commit's title.
        before_create (`Callable[[str], None]`, *optional*): called with the full repo id just
            before the repo is created, so a caller can note it for a cleanup after a crash.

    Returns:
        `str`: the repo's URL, `{endpoint}/{namespace}/{name}`.

    Raises:
        [`~merger.errors.ConfigError`], [`~merger.errors.PushTargetError`]: as :func:`check_push_target`.
        [`~merger.errors.HubError`]: the token was rejected or may not write there, or the upload
            failed; the message ends with what is on the Hub now.
    """
    target = check_push_target(repo_id, token, private=private, reuse_repo=reuse_repo)
    api = HfApi(token=token)
    if not target.exists:
        if before_create is not None:
            before_create(target.repo_id)
        with _hub_call(f"creating `{target.repo_id}`", token):
            api.create_repo(target.repo_id, private=private)
    try:
        with _hub_call(f"pushing to `{target.repo_id}`", token):
            api.upload_folder(folder_path=folder, repo_id=target.repo_id, commit_message=commit_message)
    except BaseException as err:  # a cancelled or killed upload must not leave an empty repo either
        on_hub = _undo_create(api, target.repo_id, token)[1] if not target.exists else _left_unchanged(target.repo_id)
        if isinstance(err, HubError):
            raise HubError(f"{err} {on_hub}") from None
        raise
    return f"{api.endpoint}/{target.repo_id}"


def delete_unpushed_repo(repo_id: str, token: str) -> tuple[bool, str]:
    """Delete a repo a job created and never committed to (after a crash); keep it if it holds a commit.

    Args:
        repo_id (`str`): the full repo id.
        token (`str`): the token that created it.

    Returns:
        `tuple[bool, str]`: whether the matter is settled (False: the Hub could not be asked or the
        repo not deleted; try again later), and one sentence saying what is on the Hub now.
    """
    api = HfApi(token=token)
    try:
        with _hub_call(f"checking `{repo_id}`", token):
            try:
                files = set(api.list_repo_files(repo_id))
            except RepositoryNotFoundError:
                return True, f"The repo `{repo_id}` was never created; nothing is on the Hub."
    except HubError as err:
        return False, f"The repo `{repo_id}` this job created could not be checked ({err}); delete it on the Hub if it is empty."
    if files - {".gitattributes"}:
        return True, f"The repo `{repo_id}` holds the uploaded files; it was kept."
    return _undo_create(api, repo_id, token)


def whoami(token: str) -> str:
    """The username a token belongs to.

    Args:
        token (`str`): a Hugging Face token.

    Returns:
        `str`: the user's name (their namespace on the Hub).

    Raises:
        [`~merger.errors.HubError`]: the token was rejected, or the Hub could not be reached.
    """
    with _hub_call("checking your Hugging Face token", token):
        return HfApi(token=token).whoami()["name"]


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
        return [model.id for model in HfApi(token=token).list_models(search=query.strip(), limit=limit)]
    except (httpx2.HTTPError, OSError) as err:
        logger.warning("model search failed (%s); showing no suggestions", type(err).__name__)
        return []


# ---------------------------------------------------------------- helpers


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


def _remote_tensors(api: HfApi, reference: str, info: ModelInfo) -> dict[str, TensorMeta]:
    """Every tensor's shape and dtype from the repo's safetensors headers, each checked as a local one's is
    (:mod:`merger.modelfiles`), except against the file's size: a header-only check cannot see the data."""
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
        check_index_matches(weight_map, {name: set(entries) for name, entries in headers.items()}, index_where)
    return {
        name: TensorMeta(shape, dtype) for entries in headers.values() for name, (shape, dtype, _, _) in entries.items()
    }


def _remote_header(api: HfApi, info: ModelInfo, filename: str, where: str) -> dict[str, TensorEntry]:
    """One Hub file's safetensors header, read by byte ranges (as huggingface_hub's own parser does) and checked."""
    url = hf_hub_url(info.id, filename, revision=info.sha, endpoint=api.endpoint)
    headers = build_hf_headers(token=api.token)

    def byte_range(first: int, last: int) -> bytes:
        response = get_session().get(url, headers={**headers, "range": f"bytes={first}-{last}"}, timeout=HUB_TIMEOUT)
        if response.status_code == 416:  # Range Not Satisfiable: the file ends before `first` (a 0-byte file)
            return b""
        hf_raise_for_status(response)
        return response.content

    head = byte_range(0, HEADER_FIRST_READ - 1)
    length = header_length(head, None, where)
    data = head[8 : 8 + length] if len(head) >= 8 + length else byte_range(8, 8 + length - 1)
    if len(data) < length:
        raise TruncatedWeightsError(f"{where} ends inside its safetensors header; the file on the Hub is incomplete")
    return check_header(parse_header(data, where), where, None)


def check_repo_id(repo_id: str) -> None:
    """Check a target repo id's spelling (no network).

    Raises:
        [`~merger.errors.ConfigError`]: the id is not a valid Hub repo id; the message says the rules.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"`repo`: `{excerpt(repo_id, 100)}` is not a valid Hub repo id; use `name` or `namespace/name` made of "
            "letters, digits, `-`, `_` and `.` (no `--` or `..`, not starting or ending with `-` or `.`, "
            "at most 96 characters)."
        ) from None


def _undo_create(api: HfApi, repo_id: str, token: str) -> tuple[bool, str]:
    # Best effort: the upload's own error is the one the user must see; this sentence follows it.
    try:
        with _hub_call(f"deleting `{repo_id}`", token):
            api.delete_repo(repo_id, missing_ok=True)
    except HubError as err:
        logger.warning("could not delete `%s` after a failed upload: %s", repo_id, err)
        return False, (
            f"Nothing was pushed, but the repo `{repo_id}` this job created could not be deleted ({err}); "
            f"delete it at {api.endpoint}/{repo_id}/settings."
        )
    return True, f"Nothing was pushed: the repo `{repo_id}` this job created was deleted."


def _left_unchanged(repo_id: str) -> str:
    return f"Nothing was pushed: the repo `{repo_id}` existed before and was left unchanged."


def _check_write_access(me: dict, repo_id: str) -> None:
    """Refuse a namespace the token's user may not write to, from whoami's answer alone."""
    namespace, user = repo_id.split("/")[0], me.get("name", "")
    token_role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if token_role == "read":
        raise PushTargetError(f"`repo`: your token is read-only, so it cannot push to `{repo_id}`; use a token with write access")
    if namespace == user:
        return
    roles = {org.get("name"): org.get("roleInOrg") for org in me.get("orgs") or []}
    if roles.get(namespace) in _WRITE_ROLES:
        return
    why = (
        f"your role in the organization `{namespace}` is `{roles[namespace]}`"
        if namespace in roles
        else f"`{namespace}` is neither your account (`{user}`) nor an organization you belong to"
    )
    raise PushTargetError(
        f"`repo`: you may not create or push to `{repo_id}`: {why}; push to `{user}/...` "
        "or to an organization where you have the write or admin role"
    )


def _check_reuse(repo_id: str, is_private: bool, private: bool, reuse_repo: bool) -> None:
    if not reuse_repo:
        raise PushTargetError(
            f"`repo`: `{repo_id}` already exists; choose a new name, or allow reusing it "
            "(`--reuse-repo`, or tick \"reuse existing repo\") to add the merge to it as a new commit"
        )
    if private and not is_private:
        raise PushTargetError(
            f"`repo`: `{repo_id}` exists and is public, but a private repo was asked for; merger never changes "
            "a repo's visibility: choose a new name, or make the repo private on the Hub first"
        )


@contextmanager
def _reading(reference: str, token: str | None) -> Iterator[None]:
    """Turn a missing or hidden repo into ModelNotFoundError, anything else into HubError."""
    with _hub_call(f"reading model `{reference}`", token):
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


@contextmanager
def _hub_call(action: str, token: str | None) -> Iterator[None]:
    """Re-raise huggingface_hub and network failures as HubError, with no token in the message."""
    try:
        yield
    except MergerError:
        raise
    except (httpx2.HTTPError, OSError) as err:
        # `from None`: the original exception's text is not ours to vouch for, so it is not chained.
        raise HubError(_scrub(_failure_message(action, err), token)) from None


def _failure_message(action: str, err: Exception) -> str:
    if isinstance(err, LocalTokenNotFoundError):
        return f"{action} needs a Hugging Face token: sign in (or set HF_TOKEN)."
    if isinstance(err, HfHubHTTPError):
        return _http_failure_message(action, err)
    cause = f"{type(err).__name__}: {err}"
    if isinstance(err, (httpx2.TransportError, ConnectionError)):
        return f"{action} failed: could not reach the Hub ({cause}); check the connection and retry."
    return f"{action} failed ({cause})."


def _http_failure_message(action: str, err: HfHubHTTPError) -> str:
    status = err.response.status_code
    if status == 401:
        return f"{action} failed: your Hugging Face token was rejected; sign in again."
    detail = f"HTTP {status}" + (f": {err.server_message}" if err.server_message else "")
    if status == 403:
        return f"{action} was refused ({detail}); use a token with write access to that namespace."
    return f"{action} failed on the Hub ({detail}); retry, and check the Hub's status if it persists."


def _scrub(text: str, token: str | None) -> str:
    return scrub(text, (token, get_token()))
