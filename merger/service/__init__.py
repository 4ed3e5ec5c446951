"""The one door between the front ends (the UI, its API) and the engine and the jobs.

The app calls only this package: validate, pre-flight, submit, status, cancel, the signed-in user's
jobs, a job's config, share links and Hub search. Everything here takes the caller's Hub token as a
plain string (None when signed out) and raises :class:`~merger.errors.MergerError` subclasses whose
messages are fit for people; nothing here imports gradio. The engine (torch) is imported lazily, so
importing this package stays cheap. One config text is parsed and planned once for the requests of one
form (:func:`checked`).

Modules: `identity` (who is asking), `configs` (local-path guard, validation, examples, links,
search), `models` (one picked model's details), `checklist` (the pre-flight checklist), `jobs` (submit,
status, cancel, publish, discard, my merges), `options` (a job's evaluate / review options), `insight`
(the weight report and a suggested merge, bounded). The worker's door is `run_job` (merge, evaluate,
push), imported by the worker only (it imports the engine, and so torch).
"""

from merger.service.configs import (
    Checked,
    check_local_paths,
    checked,
    examples,
    load_link,
    search_models,
    share,
    validate,
)
from merger.service.identity import owner
from merger.service.jobs import (
    TERMINAL_STATUSES,
    cancel,
    discard,
    job_config,
    job_status,
    my_jobs,
    publish,
    submit,
    worker_note,
)
from merger.service.options import JobOptions, job_options
from merger.service.checklist import CheckLine, Preflight, preflight
from merger.service.insight import CandidateScore, Limits, SuggestedMerge, limits, suggest, weight_report
from merger.service.models import ModelDetails, model_details

__all__ = [
    "CandidateScore", "CheckLine", "Checked", "JobOptions", "Limits", "ModelDetails", "Preflight", "SuggestedMerge",
    "TERMINAL_STATUSES", "cancel", "check_local_paths", "checked", "discard", "examples", "job_config", "job_options",
    "job_status", "limits", "load_link", "model_details", "my_jobs", "owner", "preflight", "publish", "search_models",
    "share", "submit", "suggest", "validate", "weight_report", "worker_note",
]
