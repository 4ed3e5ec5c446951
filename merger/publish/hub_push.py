"""Pushing to the Hugging Face Hub: the push target checked before a merge, the folder uploaded as one
commit, and a repo a failed or crashed job created deleted again.

All calls go through huggingface_hub (HF_ENDPOINT applies); its exceptions become
:class:`~merger.errors.PushTargetError` or :class:`~merger.errors.HubError` (:mod:`merger.publish.hub_calls`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from merger.errors import ConfigError, HubError, PushTargetError, excerpt
from merger.publish.hub_calls import hub_call

logger = logging.getLogger(__name__)

_WRITE_ROLES = ("write", "admin")  # organization roles (whoami's `roleInOrg`) that may create and push repos


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
    with hub_call(f"checking the push target `{repo_id}`", token):
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
        with hub_call(f"creating `{target.repo_id}`", token):
            api.create_repo(target.repo_id, private=private)
    try:
        with hub_call(f"pushing to `{target.repo_id}`", token):
            api.upload_folder(folder_path=folder, repo_id=target.repo_id, commit_message=commit_message)
    except BaseException as err:  # a cancelled or killed upload must not leave an empty repo either
        on_hub = delete_created_repo(api, target.repo_id, token)[1] if not target.exists else left_unchanged(target.repo_id)
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
        with hub_call(f"checking `{repo_id}`", token):
            try:
                files = set(api.list_repo_files(repo_id))
            except RepositoryNotFoundError:
                return True, f"The repo `{repo_id}` was never created; nothing is on the Hub."
    except HubError as err:
        return False, f"The repo `{repo_id}` this job created could not be checked ({err}); delete it on the Hub if it is empty."
    if files - {".gitattributes"}:
        return True, f"The repo `{repo_id}` holds the uploaded files; it was kept."
    return delete_created_repo(api, repo_id, token)


def whoami(token: str) -> str:
    """The username a token belongs to.

    Args:
        token (`str`): a Hugging Face token.

    Returns:
        `str`: the user's name (their namespace on the Hub).

    Raises:
        [`~merger.errors.HubError`]: the token was rejected, or the Hub could not be reached.
    """
    with hub_call("checking your Hugging Face token", token):
        return HfApi(token=token).whoami()["name"]


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


def delete_created_repo(api: HfApi, repo_id: str, token: str) -> tuple[bool, str]:
    """Delete a repo this job created, after a failure; returns (deleted, what is on the Hub now, one sentence)."""
    # Best effort: the upload's own error is the one the user must see; this sentence follows it.
    try:
        with hub_call(f"deleting `{repo_id}`", token):
            api.delete_repo(repo_id, missing_ok=True)
    except HubError as err:
        logger.warning("could not delete `%s` after a failed upload: %s", repo_id, err)
        return False, (
            f"Nothing was pushed, but the repo `{repo_id}` this job created could not be deleted ({err}); "
            f"delete it at {api.endpoint}/{repo_id}/settings."
        )
    return True, f"Nothing was pushed: the repo `{repo_id}` this job created was deleted."


def left_unchanged(repo_id: str) -> str:
    """The sentence for a failed push to a repo that existed before."""
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
