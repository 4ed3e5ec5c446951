"""Hostile and unlucky REQUESTS as data: job ids, share-link payloads, push targets, local paths on a Space,
CLI output folders and model ids. Each entry is refused with a named error, quickly, in few words, and
leaves nothing on disk or on the Hub. `tests/test_hostile_requests.py` sends each through its channels.

An entry's `field` says what `value` is, and so where it goes:

- `config`: a whole config YAML (use :func:`with_model` to wrap a model reference in a valid linear merge);
- `job_id`: a `?job=` value;
- `payload`: a share link's `?config=` payload;
- `repo`: a push target (the config is a valid one);
- `out`: the CLI's output folder (the config is a valid one). `{tmp}` stands for the test's scratch
  folder, where `file` (a file) and `foreign/notes.txt` (a folder with someone else's file) exist;
  `{fixtures}` for the fixture models.
- `eval_dataset` / `eval_text`: `/submit`'s evaluation options (the config and the repo are valid ones);
  `eval_both`: `value` as the pasted text with a dataset split set too;
- `suggest_text`: `/suggest`'s evaluation text (a valid config of a base and two fine-tunes, a valid budget);
- `budget`: `/suggest`'s budget, `"CANDIDATES MINUTES"` (each sent as the JSON number or string it parses to).

Channels (see :data:`CHANNELS_FOR`): `cli_validate` / `cli_run` (`python -m merger validate|run`),
`app_validate`, `app_submit` (a job: `/submit`, then, if it was queued, `/job_status` until it ends), `app_share`,
`app_load_link`, `app_job_status`, `app_job_config`, `app_cancel`, `app_publish`, `app_discard`, `app_preflight`
(the checklist answers with lines, not an error: a failing line stands for the entry's error), `app_weight_report`
and `app_suggest`.

The other catalogues are mapped in here, so one test sends everything: tests/hostile_catalogue.py's configs
(:data:`CONFIGS`) and tests/test_model_files.py's broken model folders (:data:`MODEL_FILES`, served by the
loopback Hub). To add another, map its entries to :class:`HostileRequest` with the channels that apply and
append them to :data:`CATALOGUE`.
"""

from __future__ import annotations

import base64
import json
import os
import random
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from hostile_catalogue import CATALOGUE as CONFIG_CATALOGUE
from hostile_catalogue import Hostile
from test_model_files import BROKEN_MODELS, llama_tensors, write_model

# The channels a value of each field can go through.
CHANNELS_FOR = {
    "config": ("cli_validate", "cli_run", "app_validate", "app_submit"),
    "job_id": ("app_job_status", "app_job_config", "app_cancel", "app_publish", "app_discard"),
    "payload": ("app_load_link",),
    "repo": ("cli_run", "app_submit", "app_preflight"),
    "out": ("cli_run",),
    "eval_dataset": ("app_submit",),
    "eval_text": ("app_submit",),
    "eval_both": ("app_submit",),
    "suggest_text": ("app_suggest",),
    "budget": ("app_suggest",),
}
# Endpoints that read a config's models (metadata, or weights within the app's bounds) before any merge.
READERS = ("app_preflight", "app_weight_report", "app_suggest")
APP_ONLY = ("app_validate", "app_submit")  # a Space's rules (local paths) exist in the app only


@dataclass(frozen=True)
class HostileRequest:
    """One hostile request.

    Attributes:
        id: a short name for the test id.
        category: the kind of input (for the counts in reports).
        field: what `value` is (`config`, `job_id`, `payload`, `repo`, `out`; see the module docstring).
        value: the hostile input itself.
        error: the class name of the error every channel must answer with (`AppError.title` in the app,
            `error: Name:` in the CLI).
        channels: the channels to send it through; defaults to every channel of its field.
        space: send it as if the app ran on a Hugging Face Space.
        private: for `repo`: ask for a private repo.
        reuse: for `repo`: allow reusing an existing repo.
        requires: an error class this entry needs that another branch adds; skipped until it exists.
        while_queued: an action the harness takes between `/submit` and the job's start (a name in
            `WHILE_QUEUED` of the test module), for what only the job itself can find.
        model: a broken model the harness builds before sending (a key of :data:`MODEL_BUILDERS`): on the
            loopback Hub as `alice/broken-<model>`, or, for what a Hub repo cannot hold (a symlink), in
            :data:`LOCAL_MODELS`.
    """

    id: str
    category: str
    field: str
    value: str
    error: str
    channels: tuple[str, ...] = ()
    space: bool = False
    private: bool = False
    reuse: bool = False
    requires: str | None = None
    while_queued: str | None = None
    model: str | None = None

    def routes(self) -> tuple[str, ...]:
        """The channels this entry goes through."""
        return self.channels or CHANNELS_FOR[self.field]


def pack(data: str | bytes) -> str:
    """A share-link payload for `data`, built like `merger.links.encode_config` but without its checks."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode("ascii").rstrip("=")


def with_model(reference: str) -> str:
    """A valid linear merge of `reference` and a fixture model (the reference is the only bad part)."""
    return (
        "merge_method: linear\nmodels:\n"
        f"  - model: {json.dumps(reference)}\n    parameters: {{weight: 1.0}}\n"
        "  - model: tests/data/fixtures/mistral-base\n    parameters: {weight: 1.0}\n"
    )


def _noise(chars: int) -> str:
    """YAML comments of incompressible text (deterministic): a config whose link would be too long."""
    rng = random.Random(8)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    lines = ("# " + "".join(rng.choice(alphabet) for _ in range(78)) for _ in range(chars // 81))
    return "merge_method: linear\n" + "\n".join(lines) + "\n"


def nan_weights(folder: Path) -> None:
    """The tiny Llama with one NaN in a weight: its headers are sound, so only reading the weights finds it."""
    tensors = llama_tensors()
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    write_model(folder, tensors)


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)

JOB_IDS = [
    HostileRequest("job-too-long", "job id", "job_id", "a" * 100_000, "JobAccessError"),
    HostileRequest("job-not-hex", "job id", "job_id", "z" * 32, "JobAccessError"),
    HostileRequest("job-uppercase", "job id", "job_id", "ABCDEF0123456789" * 2, "JobAccessError"),
    HostileRequest("job-markdown", "job id", "job_id", "[open](https://evil.example) **now**", "JobAccessError"),
    HostileRequest("job-html", "job id", "job_id", "<img src=x onerror=alert(1)>", "JobAccessError"),
    HostileRequest("job-path", "job id", "job_id", "../../x", "JobAccessError"),
    HostileRequest("job-null-byte", "job id", "job_id", "0" * 31 + "\x00", "JobAccessError"),
    HostileRequest("job-sql", "job id", "job_id", "' OR '1'='1' --", "JobAccessError"),
    HostileRequest("job-empty", "job id", "job_id", "", "JobAccessError"),
    HostileRequest("job-unknown", "job id", "job_id", "0" * 32, "JobAccessError"),
    HostileRequest("job-status-spoof", "job id", "job_id", "0" * 32 + "\n**Status:** succeeded", "JobAccessError"),
    HostileRequest("job-other-digits", "job id", "job_id", "\u0660" * 32, "JobAccessError"),  # Arabic-Indic zeros
]

LINKS = [
    HostileRequest("link-not-base64", "share link", "payload", "!!not*base64!!", "ConfigError"),
    HostileRequest("link-huge", "share link", "payload", "A" * 300_000, "ConfigError"),
    HostileRequest("link-zip-bomb", "share link", "payload", pack(b"\0" * 40_000_000), "ConfigError"),
    HostileRequest("link-truncated", "share link", "payload", pack(with_model("org/a"))[:24], "ConfigError"),
    HostileRequest("link-not-zlib", "share link", "payload", base64.urlsafe_b64encode(bytes(range(256))).decode(), "ConfigError"),
    HostileRequest("link-not-utf8", "share link", "payload", pack(b"merge_method: \xff\xfe\xfd\n"), "ConfigError"),
    HostileRequest("link-empty", "share link", "payload", "", "ConfigError"),
    HostileRequest("link-query-injection", "share link", "payload", "eJw&job=" + "0" * 32, "ConfigError"),
    HostileRequest("link-yaml-bomb", "share link", "payload", pack(BILLION_LAUGHS), "YamlAliasError", requires="YamlAliasError"),
    HostileRequest("link-deep-nesting", "share link", "payload", pack("a: " + "[" * 20_000), "NestingTooDeepError",
                   requires="NestingTooDeepError"),
    HostileRequest("share-oversized", "share link", "config", "# " + "x" * 2_000_000 + "\n", "ConfigTooLargeError",
                   channels=("app_share",)),
    HostileRequest("share-link-too-long", "share link", "config", _noise(150_000), "ConfigError", channels=("app_share",)),
]

REPOS = [
    HostileRequest("repo-other-user", "push target", "repo", "bob/theirs", "PushTargetError"),
    HostileRequest("repo-org-read-role", "push target", "repo", "hostile-readers/x", "PushTargetError"),
    HostileRequest("repo-existing-no-reuse", "push target", "repo", "alice/hostile-existing", "PushTargetError"),
    HostileRequest("repo-existing-public-private", "push target", "repo", "alice/hostile-existing", "PushTargetError",
                   private=True, reuse=True),
    HostileRequest("repo-invalid-chars", "push target", "repo", "alice/bad name!", "ConfigError"),
    HostileRequest("repo-too-long", "push target", "repo", "alice/" + "a" * 10_000, "ConfigError"),
    HostileRequest("repo-dotdot", "push target", "repo", "../x", "ConfigError"),
    HostileRequest("repo-three-parts", "push target", "repo", "alice/x/y", "ConfigError"),
    HostileRequest("repo-url", "push target", "repo", "https://huggingface.co/alice/x", "ConfigError"),
    HostileRequest("repo-html", "push target", "repo", "alice/a<script>alert(1)</script>", "ConfigError"),
    # Write access checked at /submit, lost while the job waited: the job finds it before merging.
    HostileRequest("repo-access-revoked-while-queued", "push target", "repo", "hostile-writers/x", "PushTargetError",
                   channels=("app_submit",), while_queued="revoke-write-role"),
]

SPACE_PATHS = [
    HostileRequest(f"space-{name}", "local path on a Space", "config", with_model(path), "ConfigError",
                   channels=APP_ONLY + READERS, space=True)
    for name, path in [
        ("etc", "/etc"),
        ("parent", "../.."),
        ("home", "~"),
        ("other-home", "~root/.ssh"),
        ("dot", "."),
        ("fixture-folder", "tests/data/fixtures/mistral-prose"),
        ("file-url", "file:///etc/passwd"),
    ]
]

OUTPUTS = [
    HostileRequest(f"out-{name}", "CLI output", "out", path, "ConfigError")
    for name, path in [
        ("file", "{tmp}/file"),
        ("under-a-file", "{tmp}/file/out"),
        ("foreign-files", "{tmp}/foreign"),
        ("proc", "/proc/merger-out"),
        ("proc-file", "/proc/self/status"),
        ("sys", "/sys/merger-out"),
        ("dev-null", "/dev/null"),
        ("root", "/"),
        ("input-model", "{fixtures}/mistral-prose"),
    ]
]

MODEL_IDS = [
    HostileRequest(f"model-{name}", "model id", "config", with_model(reference), "ModelNotFoundError",
                   channels=CHANNELS_FOR["config"] + READERS)
    for name, reference in [
        ("too-long-for-a-file-name", "a/" + "b" * 498),  # over the file system's 255, under the parser's limit
        ("dotdot", "org/../x"),
        ("url", "https://huggingface.co/org/model"),
        ("loopback-url", "http://127.0.0.1:1/x"),
        ("markdown", "org/a\n**x**"),
        ("missing-repo", "alice/no-such-model"),
        ("hub-id-too-long", "org/" + "a" * 97),
        ("unc-path", "\\\\server\\share"),
    ]
]

MODEL_IDS.append(
    HostileRequest("model-absurdly-long", "model id", "config", with_model("a/" + "b" * 3990), "StringTooLongError",
                   requires="StringTooLongError")
)

FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"  # shaped like a token, not one
# A job's evaluation options: refused at /submit, before anything is queued; none names a local path or
# a URL the worker would read.
EVAL_OPTIONS = [
    HostileRequest(f"eval-dataset-{name}", "evaluation option", "eval_dataset", spec, "EvalTextError")
    for name, spec in [
        ("absolute-path", "/etc/passwd:x"),
        ("parent-path", "../../etc:passwd"),
        ("home-path", "~/.cache/huggingface:token"),
        ("file-url", "file:///etc/passwd:train"),
        ("https-url", "https://huggingface.co/datasets/org/name:test"),
        ("windows-path", "C:\\Windows:system"),
        ("no-split", "org/name"),
        ("split-path", "org/name:../../x"),
        ("markdown", "org/name:test\n**x**"),
        ("too-long", "org/" + "a" * 100_000 + ":test"),
        ("token", f"{FAKE_TOKEN}/notes:test"),
    ]
] + [
    HostileRequest("eval-text-over-bound", "evaluation option", "eval_text", "x" * (64 * 1024 + 1), "EvalTextError"),
    HostileRequest("eval-text-multibyte-over-bound", "evaluation option", "eval_text", "é" * (32 * 1024 + 1),
                   "EvalTextError"),
    HostileRequest("eval-text-huge", "evaluation option", "eval_text", "y" * 4_000_000, "EvalTextError"),
    HostileRequest("eval-text-token", "evaluation option", "eval_text", f"notes\n{FAKE_TOKEN}\n", "EvalTextError"),
    HostileRequest("eval-text-and-dataset", "evaluation option", "eval_both", "some text", "EvalTextError"),
]
def _routed_moe(prose: list[str], code: list[str]) -> str:
    """A prompt-routed MoE of the Llama fixtures with these prompts."""
    def expert(kind: str, prompts: list[str]) -> str:
        return f"  - source_model: tests/data/fixtures/llama-{kind}\n    positive_prompts: {json.dumps(prompts)}\n"

    return ("base_model: tests/data/fixtures/llama-base\ngate_mode: hidden\nexperts_per_token: 1\nexperts:\n"
            + expert("prose", prose) + expert("code", code))


# Prompts run through the base at merge time: refused from the base's tokenizer at validation, before any
# weight is downloaded (the job never starts).
PROMPTS = [
    HostileRequest("moe-prompt-over-token-cap", "parameter", "config",
                   _routed_moe(["the quick brown fox " * 200], ["def main():"]), "GatePromptError"),
    HostileRequest("moe-prompts-over-total-cap", "parameter", "config",
                   _routed_moe([f"{i} " + "prose sentences " * 16 for i in range(256)],
                               [f"{i} " + "code lines " * 16 for i in range(256)]), "GatePromptError"),
]
# /suggest's text and budget, on a config it would search: refused before any model is read.
SUGGEST_INPUTS = [
    HostileRequest("suggest-text-huge", "suggest input", "suggest_text", "z" * 1_000_000, "InsightLimitError"),
    HostileRequest("suggest-text-too-short", "suggest input", "suggest_text", "too short to halve", "InsightLimitError"),
] + [
    HostileRequest(f"suggest-budget-{name}", "suggest input", "budget", budget, "InsightLimitError")
    for name, budget in [
        ("candidates-huge", "1000000000 1"),
        ("candidates-zero", "0 1"),
        ("candidates-negative", "-5 1"),
        ("minutes-huge", "2 100000"),
        ("minutes-zero", "2 0"),
        ("minutes-negative", "2 -1"),
        ("not-numbers", "many forever"),
    ]
]

# ---------------------------------------------------------------- the other catalogues, through the same channels
# Hostile configs (tests/hostile_catalogue.py): a config goes through the CLI (validate and run), /validate
# and /submit (refused there, so no job is made); a link through /load_link.
def _config_entry(entry: Hostile) -> HostileRequest:
    name, error = f"config-{entry.id}", entry.error.__name__
    if entry.via != "config":
        payload = pack(entry.text) if entry.via == "link" else entry.text
        return HostileRequest(name, entry.category, "payload", payload, error)
    try:
        entry.text.encode("utf-8")
    except UnicodeEncodeError:  # not text HTTP can carry (a lone surrogate): it reaches only a file, as its bytes
        return HostileRequest(name, entry.category, "config", entry.text, error, channels=("cli_validate", "cli_run"))
    return HostileRequest(name, entry.category, "config", entry.text, error)


CONFIGS = [_config_entry(entry) for entry in CONFIG_CATALOGUE]

# Broken model files (tests/test_model_files.py), served by the loopback Hub next to an intact model.
GOOD_HUB_MODEL = "alice/tiny-llama"
LOCAL_MODELS = Path(tempfile.gettempdir()) / f"merger-hostile-models-{os.getpid()}"
LOCAL_ONLY = {"config-symlink-loop", "weights-symlink-loop"}  # an upload follows or drops a symlink
# Found only when the weights are read: validate passes, the run and the job fail.
RUN_TIME = {"weights-truncated", "weights-duplicate-tensor", "weights-nan"}
MODEL_BUILDERS = {case.id: case.build for case in BROKEN_MODELS}
MODEL_BUILDERS["weights-nan"] = nan_weights
MODEL_ERRORS = {**{case.id: case.error.__name__ for case in BROKEN_MODELS}, "weights-nan": "NonFiniteWeightsError"}


def broken_model_reference(model: str) -> str:
    """Where the harness puts the broken model `model`: a Hub repo id, or a local folder."""
    return str(LOCAL_MODELS / model) if model in LOCAL_ONLY else f"alice/broken-{model.replace('^', '')}"


def _model_entry(model: str) -> HostileRequest:
    config = (f"merge_method: linear\nmodels:\n  - model: {GOOD_HUB_MODEL}\n    parameters: {{weight: 1.0}}\n"
              f"  - model: {json.dumps(broken_model_reference(model))}\n    parameters: {{weight: 1.0}}\n")
    channels = ("cli_run", "app_submit") if model in RUN_TIME else CHANNELS_FOR["config"]
    return HostileRequest(f"model-file-{model}", "model file", "config", config, MODEL_ERRORS[model], channels=channels,
                          model=model)


MODEL_FILES = [_model_entry(model) for model in MODEL_BUILDERS]

CATALOGUE = [*JOB_IDS, *LINKS, *REPOS, *SPACE_PATHS, *OUTPUTS, *MODEL_IDS, *EVAL_OPTIONS, *SUGGEST_INPUTS, *PROMPTS, *CONFIGS,
             *MODEL_FILES]
