"""File names, defaults and environment settings, read once at import."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
MERGE_CONFIG_FILE = "mergekit_config.yml"
MOE_CONFIG_FILE = "mergekit_moe_config.yml"
CARD_FILE = "README.md"
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# What a Hub download fetches: weights as safetensors, configs, and every tokenizer file format.
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
    "README.md",
    "*.py",  # code an `auto_map` names, carried to the output (merger.plan.remote_code); never run
    "*.model",  # sentencepiece vocabularies of custom tokenizers
]

# Tokenizer files copied byte for byte from the tokenizer's donor.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# A multimodal model's image/video processor settings, copied from the config donor (its vision tower's).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")

DEFAULT_SHARD_SIZE = 5 * 1000**3  # bytes; the Hub's usual 5GB shards

# Where the app keeps its job queue and job records (a Space's persistent storage mounts at /data).
DATA_DIR = Path(os.environ.get("MERGER_DATA_DIR", Path.home() / ".cache" / "merger"))
QUEUE_DB = Path(os.environ.get("MERGER_QUEUE_DB", DATA_DIR / "queue.db"))
JOBS_DB = Path(os.environ.get("MERGER_JOBS_DB", DATA_DIR / "jobs.db"))
# The Fernet key that seals Hub tokens on their way through the queue: from this environment variable
# when set, else created once in QUEUE_KEY_FILE (mode 0600) so that queued jobs survive an app restart.
QUEUE_KEY_ENV = "MERGER_QUEUE_KEY"
QUEUE_KEY_FILE_NAME = "queue.key"
ON_SPACE = bool(os.environ.get("SPACE_ID"))
# `redis://host:port/db`: the job queue and the job records live in this Redis, shared by workers on several
# machines (merger.jobs.redis_store); unset, they are SQLite files in DATA_DIR, for one worker beside the app.
REDIS_URL = os.environ.get("REDIS_URL", "").strip() or None
# With REDIS_URL, whether DATA_DIR/staged is one folder every worker machine mounts: a merge staged for
# review can then be published by any worker; without it, review is refused at submit.
SHARED_STAGING = os.environ.get("MERGER_SHARED_STAGING", "").strip() == "1"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


# Caps on unfinished jobs (those with these statuses): per Hub user, and over all users.
UNFINISHED_STATUSES = ("queued", "running", "awaiting_review")  # a staged merge holds the worker's disk
MAX_JOBS_PER_USER = _env_int("MERGER_MAX_JOBS_PER_USER", 2)
MAX_JOBS_TOTAL = _env_int("MERGER_MAX_JOBS_TOTAL", 20)
# A worker writes a heartbeat every WORKER_HEARTBEAT_S; after WORKER_STALE_S without one it is dead: the app
# says so, and any live worker (or the app) fails its running jobs and deletes the Hub repos they left half-made.
WORKER_STALE_S = _env_int("MERGER_WORKER_STALE_S", 30)
WORKER_HEARTBEAT_S = min(2.0, WORKER_STALE_S / 4)  # several beats per stale period, however short
# How often the app's watchdog checks that the worker it started is alive.
WATCHDOG_INTERVAL_S = 2.0
# `1`: the worker runs apart (`python -m merger.jobs.worker`); the app starts none and only shows its heartbeat.
EXTERNAL_WORKER = os.environ.get("MERGER_EXTERNAL_WORKER", "") == "1"
JOB_ID_LENGTH = 32  # uuid4 hex
# Per-request bounds for the public app: validation of metadata gives up after
# VALIDATION_TIMEOUT_S seconds (ValidationTimeoutError), at most MAX_LIMITED_CALLS validations run at
# once (abandoned ones included), and the app runs at most VALIDATE_CONCURRENCY checks and
# SUBMIT_CONCURRENCY submissions at a time, so that light requests (job status, share) always answer.
VALIDATION_TIMEOUT_S = _env_int("MERGER_VALIDATION_TIMEOUT_S", 60)
MAX_LIMITED_CALLS = _env_int("MERGER_MAX_LIMITED_CALLS", 16)
VALIDATE_CONCURRENCY = _env_int("MERGER_VALIDATE_CONCURRENCY", 4)
SUBMIT_CONCURRENCY = _env_int("MERGER_SUBMIT_CONCURRENCY", 2)
# The weight report and the merge suggestion read whole models in the app's process (docs/decisions.md,
# "Weight report and suggestion on the page"): at most INSIGHT_MAX_BYTES of stored weights over a config's
# models; a report (downloads included) within INSIGHT_TIMEOUT_S; a search within SUGGEST_MAX_MINUTES and
# SUGGEST_MAX_CANDIDATES, holding at most SUGGEST_MAX_BYTES of float32 weights, one search at a time.
INSIGHT_MAX_BYTES = _env_int("MERGER_INSIGHT_MAX_BYTES", 4 * 10**9)
INSIGHT_TIMEOUT_S = _env_int("MERGER_INSIGHT_TIMEOUT_S", 300)
SUGGEST_MAX_MINUTES = _env_int("MERGER_SUGGEST_MAX_MINUTES", 10)
SUGGEST_MAX_CANDIDATES = _env_int("MERGER_SUGGEST_MAX_CANDIDATES", 48)
SUGGEST_MAX_BYTES = _env_int("MERGER_SUGGEST_MAX_BYTES", 8 * 2**30)
# A job's evaluation after its merge, before its push (merger/service/run_job.py): tokens scored per
# text and model, and the wall time of the whole evaluation; pasted evaluation text is bounded in bytes.
JOB_EVAL_TOKENS_PER_TEXT = _env_int("MERGER_JOB_EVAL_TOKENS", 2048)
JOB_EVAL_SECONDS = _env_int("MERGER_JOB_EVAL_SECONDS", 300)
MAX_PASTED_EVAL_BYTES = 64 * 1024
# A merge staged for review is deleted (its job marked discarded) when its owner has not published or
# discarded it this long after it was staged.
REVIEW_TTL_S = _env_int("MERGER_REVIEW_TTL_S", 24 * 3600)
