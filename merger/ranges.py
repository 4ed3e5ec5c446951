"""Type and range of one config value: the single check behind every numeric or boolean setting.

Method parameters declare their :class:`Range` in their signature (see :mod:`merger.methods`); config
fields (`seed`, `layer_range`, `pad_to_multiple_of`, ...) declare theirs in :mod:`merger.config.schema`.
Either way the value is checked at validation, before any model is read, and a refusal names the
field, a short excerpt of the value and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from merger.errors import ParameterValueError, excerpt

MAX_FACTOR = 1e6  # |weight|, |lambda|, |scale|: far above any useful merge, far below float32 overflow


@dataclass(frozen=True)
class Range:
    """The values a setting accepts.

    Attributes:
        kind: `float` (ints accepted, NaN and inf never), `int` (whole numbers, `10.0` accepted) or
            `bool` (`true`/`false`; 0 and 1 accepted). Text (`"0.5"`) is never a number: the merge
            would read it as text.
        low / high: inclusive bounds of a number (None for `bool`).
        meaning: what the value is, for the error (`"a fraction of entries kept"`).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    meaning: str = ""

    def describe(self) -> str:
        """`a number from 0 to 1 (the interpolation factor)` and the like."""
        if self.kind is bool:
            text = "`true` or `false`"
        else:
            noun = "a whole number" if self.kind is int else "a number"
            text = f"{noun} from {_number(self.low)} to {_number(self.high)}"
        return f"{text} ({self.meaning})" if self.meaning else text

    def check(self, field: str, value: Any) -> None:
        """Refuse a value outside this range (None passes: the setting is absent).

        Args:
            field: the config location, e.g. `models[1].parameters.weight[0]`.
            value: the parsed YAML value.

        Raises:
            ParameterValueError: the value has another type, is NaN or infinite, or lies outside the range;
                the message names `field`, an excerpt of the value and :meth:`describe`.
        """
        problem = self.problem(value)
        if problem:
            raise ParameterValueError(f"`{field}` {problem}")

    def problem(self, value: Any) -> str | None:
        """`must be a number from 0 to 1 (...), got `1.5`; change it`, or None when `value` is allowed."""
        if value is None:
            return None
        converted = self._converted(value)
        if converted is None or (self.kind is not bool and not self.low <= converted <= self.high):
            if isinstance(value, str):  # quoted, or a word: YAML gave text, not a number or flag
                wanted = "`true` or `false`" if self.kind is bool else "a number"
                return f"must be {self.describe()}, got the text `{excerpt(value)}`; write {wanted}, without quotes"
            return f"must be {self.describe()}, got `{excerpt(value)}`; change it"
        return None

    def validator(self) -> Any:
        """A pydantic `mode="before"` validator function applying this range to a config field."""

        def check(cls: type, value: Any) -> Any:  # noqa: ARG001 - pydantic passes the model class
            problem = self.problem(value)
            if problem:
                raise ParameterValueError(problem)
            return value

        return classmethod(check)

    def _converted(self, value: Any) -> Any:
        """`value` as `kind`, or None when it is not one (NaN and inf are not numbers here)."""
        if self.kind is bool:
            plain = not isinstance(value, bool) and isinstance(value, (int, float)) and value in (0, 1)
            return bool(value) if isinstance(value, bool) or plain else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if self.kind is int:
            return value if isinstance(value, int) else (int(value) if value.is_integer() else None)
        try:
            return float(value) if isinstance(value, int) else value
        except OverflowError:  # an integer of 310 digits or more is no float: out of every range
            return None


def _number(value: float | None) -> str:
    return f"{value:,.0f}" if isinstance(value, float) and value.is_integer() else f"{value:,}"
