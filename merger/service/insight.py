"""Before the merge, for the page: the weight report of a config's models and a suggested merge.

Both read whole models in the app's process, so both are bounded (docs/decisions.md, "Weight report and
suggestion on the page"): the stored weights of the config's models at most `constants.INSIGHT_MAX_BYTES`
(checked from metadata, before any weight is read); a report, downloads included, within
`constants.INSIGHT_TIMEOUT_S`; a search within the user's budget, capped by
`constants.SUGGEST_MAX_MINUTES` and `constants.SUGGEST_MAX_CANDIDATES`, holding at most
`constants.SUGGEST_MAX_BYTES` of float32 weights, and one search at a time in the whole app.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from merger import constants
from merger.errors import ConfigError, InsightLimitError, SearchError, SignInRequiredError
from merger.service.configs import models_of

MAX_PASTED_CHARS = 200_000  # a pasted evaluation text; a search scores a few thousand tokens of it
MIN_PASTED_CHARS = 400  # halved into a search and a judging split, each must hold some text
_search_slot = threading.Lock()  # one search at a time: each holds several models in float32
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """The bounds the page states next to its buttons (from `constants`, read at call time)."""

    max_bytes: int
    report_seconds: int
    max_minutes: int
    max_candidates: int
    search_bytes: int


def limits() -> Limits:
    """The current bounds of the report and the search."""
    return Limits(constants.INSIGHT_MAX_BYTES, constants.INSIGHT_TIMEOUT_S, constants.SUGGEST_MAX_MINUTES,
                  constants.SUGGEST_MAX_CANDIDATES, constants.SUGGEST_MAX_BYTES)


def weight_report(yaml_text: str, token: str | None) -> Any:
    """The pre-merge weight report of a config's models (task vector norms, cosines, sign conflicts).

    Args:
        yaml_text: a merge config naming at least two models (the base is its `base_model`, else the first).
        token: the caller's Hub token, or None.

    Returns:
        A :class:`merger.evaluate.report.WeightReport` (groups in checkpoint order, warnings).

    Raises:
        SignInRequiredError: on a Space, a caller without a token (signed out).
        ConfigError: the config does not parse, is multi-stage or mergekit-moe, or names a LoRA input.
        InsightLimitError: the models' stored weights are over `constants.INSIGHT_MAX_BYTES` or the Hub
            cache's free disk, or the report took longer than `constants.INSIGHT_TIMEOUT_S`.
        ModelNotFoundError / HubError / ModelFileError subclasses: a model cannot be read.
    """
    from merger.evaluate.report import report_for_config

    _single_merge(yaml_text, token, "the weight report")
    return _limited(lambda: report_for_config(yaml_text, token), "the weight report (downloading and reading "
                    "the weights)")


def _limited(call: Callable[[], T], what: str) -> T:
    """`call()` within `constants.INSIGHT_TIMEOUT_S`, or InsightLimitError naming that limit (the work
    left behind stops at its next tensor or download)."""
    from merger.errors import ValidationTimeoutError
    from merger.timeouts import run_limited

    try:
        return run_limited(call, constants.INSIGHT_TIMEOUT_S, what)
    except ValidationTimeoutError:
        raise InsightLimitError(f"{what} did not finish within this app's {constants.INSIGHT_TIMEOUT_S:g}-second "
                                "limit (the models are large, or the server is busy); try smaller models, or "
                                "`python -m merger validate CONFIG --report` on your own machine") from None


def _single_merge(yaml_text: str, token: str | None, what: str) -> Any:
    """The config's :class:`Checked` models, after the checks every request here shares: a signed-in
    caller on a Space, one merge, no LoRA inputs, stored weights within `constants.INSIGHT_MAX_BYTES`."""
    from merger.config.schema import MoEConfig
    from merger.dtypes import DTYPE_SIZES

    if constants.ON_SPACE and not token:  # downloads and CPU on a public Space go to people it can name
        raise SignInRequiredError(f"{what} downloads and reads the models' weights on this Space, so it needs "
                                  "you signed in: sign in with Hugging Face first")
    models = models_of(yaml_text, token)
    if models.config is None or isinstance(models.config, MoEConfig):
        raise ConfigError(f"{what} compares the models of one merge; a multi-stage or mergekit-moe config "
                          "has several: check one stage's config at a time")
    adapters = [str(ref) for ref in models.config.referenced_models() if ref.lora]
    if adapters:
        raise ConfigError(f"{what} reads full models; `{adapters[0]}` is a model with a LoRA adapter: "
                          "merge the adapter into its model first, or leave it out")
    stored = sum(t.numel * DTYPE_SIZES.get(t.dtype, 4) for meta in models.metadata.values()
                 for t in meta.tensors.values())
    if stored > constants.INSIGHT_MAX_BYTES:
        raise InsightLimitError(f"{what} would read {stored / 1e9:.2f} GB of weights, over this app's "
                                f"{constants.INSIGHT_MAX_BYTES / 1e9:.2f} GB limit; use fewer or smaller models, "
                                "or run `python -m merger validate --report` / `suggest` on your own machine")
    _check_download_space(models)
    return models


def _check_download_space(models: Any) -> None:
    """Refuse when the Hub models' weights would not fit on the disk of the Hub cache (as the merge's
    pre-flight refuses a download over the worker's free disk)."""
    import shutil

    from huggingface_hub.constants import HF_HUB_CACHE

    from merger.config.references import is_hub_id
    from merger.dtypes import DTYPE_SIZES

    hub = [ref.key for ref in models.config.referenced_models() if is_hub_id(ref.model)]
    download = sum(t.numel * DTYPE_SIZES.get(t.dtype, 4) for key in hub for t in models.metadata[key].tensors.values())
    cache = Path(HF_HUB_CACHE)
    while not cache.exists() and cache != cache.parent:
        cache = cache.parent
    free = shutil.disk_usage(cache).free
    if download > free:
        raise InsightLimitError(f"the models' weights ({download / 1e9:.2f} GB to download) do not fit in the "
                                f"{free / 1e9:.2f} GB free on this server's disk; use smaller models")


@dataclass(frozen=True)
class CandidateScore:
    """One scored candidate of a search.

    Attributes:
        number: 1 for the first candidate tried.
        bits: mean bits/token on the search split (lower is better).
        method: the candidate's `merge_method`.
        parameters: its parameters, e.g. `density=0.5,0.5 weight=1,1 lambda=1`.
    """

    number: int
    bits: float
    method: str
    parameters: str


@dataclass(frozen=True)
class SuggestedMerge:
    """The search's outcome: the best candidate as a mergekit YAML config and the summary for people
    (the parents, the naive average and the suggestion on the judging split)."""

    best: CandidateScore
    yaml: str
    summary: str
    tried: int


def suggest(yaml_text: str, token: str | None, candidates: int, minutes: float,
            text: str = "") -> Iterator[CandidateScore | SuggestedMerge]:
    """Search a merge of the config's fine-tunes of its `base_model`; yields each scored candidate as it
    comes, then the :class:`SuggestedMerge`. Leaving the iterator early stops the search after the
    candidate being scored.

    Args:
        yaml_text: a merge config with a `base_model` and two or three other models (its fine-tunes).
        token: the caller's Hub token, or None.
        candidates: candidates merged and scored at most (1 to `constants.SUGGEST_MAX_CANDIDATES`).
        minutes: wall time of the search at most (0 to `constants.SUGGEST_MAX_MINUTES`).
        text: evaluation text to search and judge on (first half searched, second half judges); empty:
            the shipped set (prose, code, chat), halved the same way.

    Raises:
        SignInRequiredError: on a Space, a caller without a token (signed out).
        ConfigError / SearchError: the config does not name a base and 2-3 fine-tunes of it.
        InsightLimitError: over a bound above, or another search is running.
        EvalTextError, EvalModelError, ModelNotFoundError, HubError: a text or model cannot be used.
    """
    from merger.engine import pick_device
    from merger.evaluate.search import SearchBudget
    from merger.io.resolve import materialize

    budget = _budget(candidates, minutes)
    models = _single_merge(yaml_text, token, "suggesting a merge")
    base, fine_tunes = _base_and_fine_tunes(models.config)
    _check_search_memory(models.metadata[base.key], len(fine_tunes))
    search_texts, judge_texts = _texts(text)
    if not _search_slot.acquire(blocking=False):
        raise InsightLimitError("another merge suggestion is running on this app (one at a time); "
                                "try again in a few minutes")
    try:
        refs = [base, *fine_tunes]
        folders = _limited(lambda: materialize(refs, token), "downloading the models to search on")
    except BaseException:
        _search_slot.release()
        raise
    named = {str(ref): folders[ref.key] for ref in refs}
    search = _Search(SearchBudget(candidates=budget[0], seconds=budget[1], tokens_per_text=2048,
                                  judge_tokens_per_text=2048, max_bytes=constants.SUGGEST_MAX_BYTES))
    return search.run(str(base), [str(ref) for ref in fine_tunes], named, search_texts, judge_texts,
                      pick_device("auto"))


def _budget(candidates: Any, minutes: Any) -> tuple[int, float]:
    """(candidates, seconds) within the app's caps, or InsightLimitError naming the field and the cap."""
    try:
        count, span = int(candidates), float(minutes)
    except (TypeError, ValueError):
        raise InsightLimitError("the budget needs a number of candidates and of minutes") from None
    if not 1 <= count <= constants.SUGGEST_MAX_CANDIDATES:
        raise InsightLimitError(f"candidates: {count} is outside 1-{constants.SUGGEST_MAX_CANDIDATES} "
                                "(this app's cap); choose a number in that range")
    if not 0 < span <= constants.SUGGEST_MAX_MINUTES:
        raise InsightLimitError(f"minutes: {span:g} is outside 0-{constants.SUGGEST_MAX_MINUTES} "
                                "(this app's cap); choose more than 0 and at most the cap")
    return count, 60.0 * span


def _base_and_fine_tunes(config: Any) -> tuple[Any, list[Any]]:
    """The config's `base_model` and its 2-3 other models, or SearchError saying what to set."""
    base = config.base_model
    if base is None or any(item.model.key == base.key for item in config.models or []):
        raise SearchError("suggesting a merge needs `base_model` set to the model the fine-tunes were trained "
                          "from, not listed among `models`; set it in the form, then list the 2-3 fine-tunes")
    fine_tunes = [ref for ref in config.referenced_models() if ref.key != base.key]
    if not 2 <= len(fine_tunes) <= 3:
        raise SearchError(f"suggesting a merge takes two or three fine-tunes of the base, the config names "
                          f"{len(fine_tunes)}; list 2-3 models besides `base_model`")
    return base, fine_tunes


def _check_search_memory(base_metadata: Any, fine_tunes: int) -> None:
    """Refuse before any download when the search's float32 copies would exceed `SUGGEST_MAX_BYTES`."""
    parameters = sum(t.numel for t in base_metadata.tensors.values())
    needed = (fine_tunes + 2) * parameters * 4  # base, fine-tunes and the model being scored (search.py)
    if needed > constants.SUGGEST_MAX_BYTES:
        raise InsightLimitError(f"searching these models needs about {needed / 2**30:.1f} GiB of float32 weights, "
                                f"over this app's {constants.SUGGEST_MAX_BYTES / 2**30:.1f} GiB limit; search on "
                                "smaller models, or run `python -m merger suggest` on your own machine")


def _texts(text: str) -> tuple[list[Any], list[Any]]:
    """(search split, judging split): halves of the pasted text, or of the shipped set."""
    from merger.evaluate.text import EvalText, default_texts, split_in_halves

    text = (text or "").strip()
    if not text:
        return split_in_halves(default_texts())
    if not MIN_PASTED_CHARS <= len(text) <= MAX_PASTED_CHARS:
        raise InsightLimitError(f"the evaluation text has {len(text):,} characters; paste "
                                f"{MIN_PASTED_CHARS:,}-{MAX_PASTED_CHARS:,} (it is halved: one half searches, "
                                "the other judges), or leave it empty for the shipped set")
    return split_in_halves([EvalText("pasted", text)])


class _Stopped(Exception):
    """The page left: the search stops after its current candidate."""


class _Search:
    """One search in a thread of its own, its candidates handed to the caller's iterator as they come."""

    def __init__(self, budget: Any):
        self.budget = budget
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()

    def run(self, base: str, fine_tunes: list[str], folders: dict, search_texts: list, judge_texts: list,
            device: Any) -> Iterator[CandidateScore | SuggestedMerge]:
        """Start the search (it holds the app's search slot until it ends) and yield what it finds."""
        thread = threading.Thread(target=self._work, name="merger-suggest", daemon=True,
                                  args=(base, fine_tunes, folders, search_texts, judge_texts, device))
        thread.start()
        return self._events()

    def _work(self, base, fine_tunes, folders, search_texts, judge_texts, device) -> None:
        from merger.evaluate.search import suggest_merge

        try:
            suggestion = suggest_merge(base, fine_tunes, folders, search_texts, judge_texts=judge_texts,
                                       budget=self.budget, device=device, on_candidate=self._scored)
            self.events.put(SuggestedMerge(_score(suggestion.best), suggestion.yaml, suggestion.summary(),
                                           len(suggestion.tried)))
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the caller, who re-raises it
            self.events.put(err)
        finally:
            _search_slot.release()

    def _scored(self, scored: Any) -> None:
        if self.stop.is_set():
            raise _Stopped()
        self.events.put(_score(scored))

    def _events(self) -> Iterator[CandidateScore | SuggestedMerge]:
        try:
            while True:
                event = self.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, SuggestedMerge):
                    return
        finally:
            self.stop.set()


def _score(scored: Any) -> CandidateScore:
    label = scored.candidate.label()
    return CandidateScore(scored.index + 1, scored.bits, scored.candidate.method,
                          label.removeprefix(scored.candidate.method).strip())
