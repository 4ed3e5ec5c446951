"""The one door between the UI (or any front end) and the engine and the jobs.

The app calls only this module: validate, pre-flight, submit, status, cancel, the signed-in user's
jobs, a job's config, share links and Hub search. Everything here takes the caller's Hub token as a
plain string (None when signed out) and raises :class:`~merger.errors.MergerError` subclasses whose
messages are fit for people; nothing here imports gradio. The engine (torch) is imported lazily, so
importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger import constants
from merger.errors import ConfigError, MergerError, VocabSizeError
from merger.config.examples import Example, load_examples
from merger.config.parse import parse_config_documents
from merger.config.references import local_paths
from merger.links import decode_config, share_url
from merger.scrub import scrub

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
# What the time estimate assumes (the worker's measured order of magnitude, see README "speed").
DOWNLOAD_BYTES_PER_S = 50e6
MERGE_BYTES_PER_S = 200e6

_OWNER_TTL_S = 300.0
_OWNER_CACHE_SIZE = 1024
_owners: dict[str, tuple[str, float]] = {}  # sha256 of a token -> (its Hub username, when it expires)
_owners_lock = threading.Lock()


# ---------------------------------------------------------------- who is asking
def owner(token: str | None) -> str | None:
    """The Hub username a token belongs to (whoami, remembered a few minutes per token); None without one.

    Raises:
        HubError: the token was rejected or the Hub could not be reached.
    """
    if not token:
        return None
    key = hashlib.sha256(token.encode()).hexdigest()  # the cache never holds the token itself
    now = time.monotonic()
    with _owners_lock:
        cached = _owners.get(key)
    if cached and cached[1] > now:
        return cached[0]
    from merger.publish.hub_push import whoami

    name = whoami(token)
    with _owners_lock:
        if len(_owners) >= _OWNER_CACHE_SIZE:
            _owners.clear()
        _owners[key] = (name, now + _OWNER_TTL_S)
    return name


# ---------------------------------------------------------------- configs
def check_local_paths(yaml_text: str) -> None:
    """On a Space, models must come from the Hub: a local path would read the Space's own disk.

    Raises:
        ConfigError: naming the local paths, on a Space only.
    """
    if constants.ON_SPACE:
        paths = _local_paths(yaml_text)
        if paths:
            raise ConfigError(
                f"local paths are not available here ({', '.join(f'`{p}`' for p in paths)}); "
                "use Hub model ids like `org/name`"
            )


def _local_paths(yaml_text: str) -> list[str]:
    """The local references of every stage of a config; none when the parser refuses it (validation names why)."""
    try:
        return local_paths([value for value, _ in parse_config_documents(yaml_text)])
    except ConfigError:
        return []


def validate(yaml_text: str, token: str | None) -> Any:
    """Check a config against its models' metadata (no weights).

    Returns:
        A :class:`merger.validate.ValidationReport`.

    Raises:
        MergerError: the first problem (or all of them, as ConfigProblems).
    """
    from merger.validate import validate_config  # the engine loads torch: only when asked

    check_local_paths(yaml_text)
    return validate_config(yaml_text, token)


def examples(directory: str | os.PathLike[str]) -> list[Example]:
    """The one-click example configs the page offers (fixture twins with local paths hidden on a Space)."""
    found = load_examples(directory)
    if constants.ON_SPACE:
        found = [e for e in found if not _local_paths(e.yaml_text)]
    return found


def share(base_url: str, yaml_text: str) -> str:
    """The link that reopens `yaml_text` byte for byte (see :func:`merger.links.share_url`)."""
    return share_url(base_url, yaml_text)


def load_link(payload: str) -> str:
    """The YAML a share link's payload carries. Raises ConfigError for a damaged link."""
    return decode_config(payload)


def search_models(query: str, token: str | None, limit: int = 20) -> list[str]:
    """Hub model ids matching `query` (empty on any Hub failure: a suggestion list never breaks a form)."""
    query = (query or "").strip()
    if len(query) < 2 or query.startswith(("/", ".", "~")):
        return []
    from merger.publish.hub_read import search_models as hub_search

    return list(dict.fromkeys(hub_search(query, token=token, limit=limit)))


# ---------------------------------------------------------------- pre-flight
@dataclass(frozen=True)
class CheckLine:
    """One line of the pre-flight checklist.

    Attributes:
        name: what was checked (`models`, `compatibility`, `target repo`, `resources`).
        ok: whether it passes.
        detail: what was found (a passing line says what; a failing one what is wrong).
        fix: for a failing line, what to change in the form.
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Preflight:
    """The checklist shown before Merge is enabled; Merge is enabled only when `ok`."""

    lines: tuple[CheckLine, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """Every line passes (and there is at least one)."""
        return bool(self.lines) and all(line.ok for line in self.lines)


def preflight(yaml_text: str, token: str | None, repo_id: str, private: bool, reuse_repo: bool) -> Preflight:
    """The checklist for a config and a push target, from metadata only (no weights are fetched).

    Lines: `config` (parses), `models` (every model reachable with the caller's rights),
    `compatibility` (architectures, shapes, layer ranges, vocabularies), `target repo` (valid,
    writable, new or explicitly reused) and `resources` (download, output, peak memory and time
    next to the worker's free disk and RAM). A line that cannot be checked because an earlier one
    failed is left out.
    """
    from merger.config.load import load_config
    from merger.io.resolve import fetch_metadata
    from merger.timeouts import run_limited
    from merger.plan.entry import plan_config

    lines: list[CheckLine] = []
    try:
        check_local_paths(yaml_text)
        config = load_config(yaml_text)
    except MergerError as err:
        lines.append(CheckLine("config", False, _short(err), "fix the field it names in the form or the YAML"))
        lines.append(_target_line(repo_id, token, private, reuse_repo))
        return Preflight(tuple(lines))
    lines.append(CheckLine("config", True, "the config parses"))
    limit = constants.VALIDATION_TIMEOUT_S  # as for /validate: a slow Hub never holds a worker thread for long
    try:
        refs = config.referenced_models()
        metadata = run_limited(lambda: fetch_metadata(refs, token), limit, "fetching the models' metadata")
        lines.append(CheckLine("models", True, _models_summary(metadata)))
        plan, metadata = run_limited(lambda: plan_config(config, token), limit, "checking the models against each other")
    except MergerError as err:
        name = "compatibility" if len(lines) > 1 and lines[-1].name == "models" else "models"
        lines.append(CheckLine(name, False, _short(err), _fix_for(err, name)))
        lines.append(_target_line(repo_id, token, private, reuse_repo))
        return Preflight(tuple(lines))
    lines.append(CheckLine("compatibility", True, _plan_summary(plan)))
    lines.append(_target_line(repo_id, token, private, reuse_repo))
    lines.append(_resources_line(plan, metadata))
    return Preflight(tuple(lines))


def _models_summary(metadata: dict[str, Any]) -> str:
    """`N model(s) reachable: `id` (architecture, parameters, license), ...`."""
    parts = []
    for meta in metadata.values():
        architecture = (meta.config.get("architectures") or ["unknown architecture"])[0]
        count = sum(t.numel for t in meta.tensors.values())
        parts.append(f"`{meta.reference}` ({architecture}, {_count(count)} parameters, license {meta.license or 'unknown'})")
    return f"{len(metadata)} model(s) reachable: " + ", ".join(parts)


def _plan_summary(plan: Any) -> str:
    architecture = (plan.output_config.get("architectures") or ["?"])[0]
    text = f"{plan.pretty_name}: {architecture}, {plan.num_layers} layers, {_count(plan.parameter_count)} parameters"
    return "; ".join([text, *(f"note: {w}" for w in plan.warnings)])


def _fix_for(err: MergerError, name: str) -> str:
    if isinstance(err, VocabSizeError) or "vocab" in str(err).lower():
        return "set Tokenizer to `union` (or `base`) in the form, so the vocabularies are aligned"
    if name == "models":
        return "check the model ids in the form; for a private or gated model, sign in with an account that can read it"
    return "change the models, layer ranges or parameters the message names, in the form"


def _target_line(repo_id: str, token: str | None, private: bool, reuse_repo: bool) -> CheckLine:
    repo_id = (repo_id or "").strip()
    if not repo_id:
        return CheckLine("target repo", False, "no repo named", "type a repo name next to Merge, e.g. `my-merge`")
    if not token:
        return CheckLine("target repo", False, "signed out", "sign in with Hugging Face to push the result")
    from merger.publish.hub_push import check_push_target

    try:
        target = check_push_target(repo_id, token, private=bool(private), reuse_repo=bool(reuse_repo))
    except MergerError as err:
        fix = "tick “reuse existing repo” or choose a new name" if "exists" in str(err) else "choose another repo name"
        return CheckLine("target repo", False, _short(err), fix)
    state = "exists, a new commit will be pushed (reuse)" if target.exists else "new"
    visibility = "private" if target.private else "public"
    return CheckLine("target repo", True, f"`{target.repo_id}`: {state}, {visibility}")


def _resources_line(plan: Any, metadata: dict[str, Any]) -> CheckLine:
    from merger.dtypes import DTYPE_SIZES

    from merger.constants import DEFAULT_SHARD_SIZE
    from merger.publish.stream_push import MAX_PENDING_SHARDS

    # The worker reads only the tensors the plan uses (by byte ranges) and uploads each shard as it is
    # written, so its disk holds the shard being written and those waiting to upload, never the inputs.
    read = {(s.model, s.name) for job in plan.jobs for s in [*job.sources, *([job.base] if job.base else [])]}
    download = sum(
        metadata[key].tensors[name].numel * DTYPE_SIZES.get(metadata[key].tensors[name].dtype, 4) for key, name in read
    )
    output = sum(job.nbytes for job in plan.jobs)
    on_disk = min(output, (MAX_PENDING_SHARDS + 1) * DEFAULT_SHARD_SIZE)
    largest = max((job.nbytes // max(1, DTYPE_SIZES.get(job.dtype, 4)) for job in plan.jobs), default=0)
    inputs = max((len(job.sources) + (job.base is not None) for job in plan.jobs), default=1)
    peak = largest * 4 * (inputs + 2)  # float32 copies of one tensor's inputs, the output and a temporary
    seconds = download / DOWNLOAD_BYTES_PER_S + output / MERGE_BYTES_PER_S
    disk = shutil.disk_usage(_existing_parent(constants.DATA_DIR)).free
    ram = _available_ram()
    detail = (
        f"download {_bytes(download)}, output {_bytes(output)} ({_bytes(on_disk)} on disk at once), peak memory "
        f"~{_bytes(peak)}, about {_duration(seconds)}; the worker has {_bytes(disk)} disk and {_bytes(ram)} RAM free"
    )
    if on_disk > disk:
        return CheckLine("resources", False, detail, "merge fewer or smaller models, or a layer range (slices)")
    if ram and peak > ram:
        return CheckLine("resources", False, detail, "choose a smaller `dtype` or fewer models")
    return CheckLine("resources", True, detail)


def _existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _short(err: Exception, limit: int = 600) -> str:
    text = scrub(str(err))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- jobs
def submit(yaml_text: str, repo_id: str, token: str, private: bool, reuse_repo: bool) -> str:
    """Check caps, the push target and the config, then queue the merge. Returns the job id.

    Raises:
        JobLimitError, PushTargetError, ConfigError, HubError, ...: the first refusal, before anything is queued.
    """
    from merger.jobs import store as jobs
    from merger.jobs import queue
    from merger.publish.hub_push import check_push_target

    user = owner(token)
    jobs.check_caps(user)  # the cheap refusal first; submit checks again with the insert
    # The target is checked before the config: a repo the user may not write to fails now, not after the merge.
    target = check_push_target(repo_id, token, private=bool(private), reuse_repo=bool(reuse_repo))
    validate(yaml_text, token)
    return str(queue.submit(yaml_text, target.repo_id, token, user, bool(private), bool(reuse_repo)))


def job_status(job_id: str, token: str | None) -> dict[str, Any]:
    """The caller's own job: id, status, progress (0-1), current_tensor, log_tail, result_url, error,
    error_type (the failing error's class name), worker (a note when no worker is alive), created_at / updated_at (epoch s), elapsed_s,
    remaining_s (estimated, None until there is progress) and queue_position (1 = next; None unless queued).

    Raises:
        JobAccessError: a malformed id, no such job, or another user's job.
    """
    from merger.jobs import store as jobs

    jobs.check_job_id(job_id)  # before any Hub call: a malformed id costs nothing
    return _job_dict(jobs.owned_job(job_id, owner(token)))


def job_config(job_id: str) -> str:
    """The config of any job (what its link shares with everyone). Raises JobAccessError."""
    from merger.jobs import store as jobs

    return jobs.shared_config(job_id)


def cancel(job_id: str, token: str | None) -> bool:
    """Cancel the caller's queued or running job; False when it had already finished."""
    from merger.jobs import store as jobs

    jobs.check_job_id(job_id)
    return bool(jobs.cancel(job_id, owner(token)))


def my_jobs(token: str | None, limit: int = 50) -> list[dict[str, Any]]:
    """The signed-in user's jobs, newest first (as :func:`job_status` dicts plus repo_id and config_yaml)."""
    from merger.jobs import store as jobs

    user = owner(token)
    if not user:
        return []
    return [
        {**_job_dict(job), "repo_id": job.repo_id, "config_yaml": job.config_yaml}
        for job in jobs.list_jobs(user, limit=limit)
    ]


def worker_note() -> str | None:
    """"No worker alive since ..." when the worker's heartbeat is missing or stale, else None."""
    from merger.jobs.worker_notes import last_heartbeat

    beat = last_heartbeat()
    if beat is not None and time.time() - beat <= constants.WORKER_STALE_S:
        return None
    since = "it started" if beat is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(beat))
    return f"No worker alive since {since}: queued jobs wait until a worker is running again."


def _job_dict(job: Any) -> dict[str, Any]:
    from merger.jobs import store as jobs

    status = str(getattr(job.status, "value", job.status))
    progress = float(job.progress or 0.0)
    now = time.time()
    elapsed = max(0.0, (job.updated_at if status in TERMINAL_STATUSES else now) - job.created_at)
    running = status == "running" and progress > 0
    return {
        "id": job.id,
        "status": status,
        "progress": progress,
        "current_tensor": job.current_tensor,
        "log_tail": scrub(job.log_tail or ""),
        "result_url": job.result_url,
        "error": scrub(job.error) if job.error else None,
        "error_type": job.error_type,
        "worker": None if status in TERMINAL_STATUSES else worker_note(),
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "elapsed_s": round(elapsed, 1),
        "remaining_s": round(elapsed * (1 - progress) / progress, 1) if running else None,
        "queue_position": jobs.queue_position(job.id) if status == "queued" else None,
    }
