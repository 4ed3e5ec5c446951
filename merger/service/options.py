"""A job's options beside its config: evaluate before the push, review before the push, the evaluation text.

They are not part of the mergekit YAML (which stays mergekit's): they travel with the submission and
are kept in the job record as JSON (:meth:`JobOptions.to_json`). Pure: pydantic only.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from merger import constants
from merger.errors import ConfigError, EvalTextError, excerpt
from merger.scrub import TOKEN_PATTERN

# `namespace/name:split`, the shape `merger.evaluate.text.dataset_texts` reads; the Hub checks the rest.
_DATASET_SPEC = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}:[\w.-]{1,64}")


class JobOptions(BaseModel):
    """What a job does after its merge, before its push.

    Attributes:
        evaluate: score the merge and its parents (bits/token, KL from each parent, greedy answers)
            before the push; the table goes into the job record and the card. The form and the API
            default to True; a record without options (older jobs) is pushed unevaluated.
        review: stop at `awaiting_review` with the output staged on the worker; the owner publishes or
            discards it (undecided staged outputs are deleted after `constants.REVIEW_TTL_S`).
        eval_dataset: a Hub dataset split `ID:SPLIT` to evaluate on; empty for the shipped set.
        eval_text: pasted text to evaluate on (at most `constants.MAX_PASTED_EVAL_BYTES` UTF-8 bytes);
            empty for the shipped set. At most one of `eval_dataset` and `eval_text` is set.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    evaluate: bool = True
    review: bool = False
    eval_dataset: str = ""
    eval_text: str = ""

    def to_json(self) -> str:
        """The options as the job record keeps them."""
        return self.model_dump_json()

    @classmethod
    def from_record(cls, text: str | None) -> "JobOptions":
        """The options a record keeps; a record without any (from before options existed) is not evaluated."""
        return cls.model_validate_json(text) if text else cls(evaluate=False)


def job_options(evaluate: bool = True, review: bool = False, eval_dataset: str = "", eval_text: str = "",
                token: str | None = None) -> JobOptions:
    """The options of a submission, checked: the evaluation text choice and its bounds.

    Args:
        evaluate: evaluate before the push.
        review: wait for the owner's publish or discard before the push.
        eval_dataset: `ID:SPLIT` of a Hub dataset, or empty.
        eval_text: pasted evaluation text, or empty.
        token: the submitter's token, refused inside the pasted text (records never hold a token).

    Returns:
        The :class:`JobOptions`, blanks stripped from the dataset.

    Raises:
        EvalTextError: both texts given, a malformed dataset split, pasted text over the bound, or
            either holding a token.
        ConfigError: `review` with several worker machines (`REDIS_URL`) whose staged merges are not on
            storage they share (`MERGER_SHARED_STAGING`): a publish could be taken by a machine without it.
    """
    if review and constants.REDIS_URL and not constants.SHARED_STAGING:
        raise ConfigError("`review` is not available on this app: its workers run on several machines without a "
                          "shared staging folder (set MERGER_SHARED_STAGING=1 once DATA_DIR/staged is shared); "
                          "untick review to push when the merge is done")
    eval_dataset, eval_text = (eval_dataset or "").strip(), eval_text or ""
    if eval_dataset and eval_text.strip():
        raise EvalTextError("`eval_dataset` and `eval_text` are both set; choose one evaluation text (or neither "
                            "for the shipped set)")
    if TOKEN_PATTERN.search(eval_dataset) or (token and token in eval_dataset):  # the record keeps it, and logs
        raise EvalTextError("`eval_dataset` contains what looks like a Hugging Face token (`hf_...`); name the "
                            "dataset as `ID:SPLIT`: your sign-in already gives the worker your access")
    if eval_dataset and not _DATASET_SPEC.fullmatch(eval_dataset):
        raise EvalTextError(f"`eval_dataset`: `{excerpt(eval_dataset)}` is not a dataset split; write it as "
                            "`ID:SPLIT`, e.g. `org/name:test`")
    size = len(eval_text.encode("utf-8"))
    if size > constants.MAX_PASTED_EVAL_BYTES:
        raise EvalTextError(f"`eval_text` is {size:,} bytes, over the {constants.MAX_PASTED_EVAL_BYTES:,}-byte "
                            "limit for pasted text; paste less, or name a Hub dataset split instead")
    if TOKEN_PATTERN.search(eval_text) or (token and token in eval_text):
        raise EvalTextError("`eval_text` contains what looks like a Hugging Face token (`hf_...`); remove it: the "
                            "text is kept with the job")
    return JobOptions(evaluate=bool(evaluate), review=bool(review), eval_dataset=eval_dataset,
                      eval_text=eval_text if eval_text.strip() else "")
