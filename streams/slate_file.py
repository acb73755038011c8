"""Reading mature slates from JSONL for ``riskgate calibrate``.

One slate per line::

    {"k": 20, "safe_pool_size": 4, "items": [{"score": 0.31, "flagged": true}, ...]}

An item may say ``"blocked": true``: its user had blocked one of its tags when
the slate was served, so the ranker drops it whatever λ̂ (SPEC §8) and it is
never kept at any λ; its ``score`` may then be ``null`` and its flag does not
count. riskgate's own dumps (``/debug/window-slates``, ``replay --dump-slates``)
write such items so.

Every line is validated (strict types, finite scores, ``k ≥ 1``, at most ``k``
items); the first bad line stops the read with its line number and the problem,
so no threshold is ever computed from part of a file. Blank lines are skipped;
extra keys (``item_id``, ``slate_id``...) are allowed and ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Iterator

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calibration.slates import DROPPED, Slate, SlateBatch

__all__ = ["SlateFileError", "SlateLine", "read_slates", "iter_slates", "item_json"]


class SlateFileError(ValueError):
    """A bad line: ``str(err)`` is ``PATH:LINE: problem``."""

    def __init__(self, path: str, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


class SlateItem(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    score: float | None
    flagged: bool
    blocked: bool = False

    @field_validator("score")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("score must be a finite number")
        return v

    @model_validator(mode="after")
    def _scored(self) -> "SlateItem":
        if self.score is None and not self.blocked:
            raise ValueError("score must be a finite number (null only for a blocked item)")
        return self

    @property
    def filter_score(self) -> float:
        """The score the filter compares with λ: -inf (never kept) for a blocked item."""
        return DROPPED if self.blocked else self.score


def item_json(score: float, flagged: bool) -> dict:
    """One item of a mature slate as a line holds it (score -inf: an item its user's tag rules dropped)."""
    if score == DROPPED:
        return {"score": None, "flagged": flagged, "blocked": True}
    return {"score": score, "flagged": flagged}


class SlateLine(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    k: Annotated[int, Field(ge=1)]
    safe_pool_size: Annotated[int, Field(ge=0)]
    items: list[SlateItem]

    @model_validator(mode="after")
    def _fits(self) -> "SlateLine":
        if len(self.items) > self.k:
            raise ValueError(f"{len(self.items)} items exceed k={self.k}")
        return self


def _problem(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"]) or "slate"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def iter_slates(path: str | Path) -> Iterator[Slate]:
    """Yield validated :class:`Slate` objects; raise :class:`SlateFileError` on the first bad line."""
    name = str(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise SlateFileError(name, lineno, f"bad JSON: {e}") from None
            if not isinstance(obj, dict):
                raise SlateFileError(name, lineno, "a slate must be a JSON object")
            try:
                s = SlateLine.model_validate(obj)
            except ValidationError as e:
                raise SlateFileError(name, lineno, _problem(e)) from None
            yield Slate.served(tuple(i.filter_score for i in s.items), tuple(i.flagged for i in s.items), s.k,
                               s.safe_pool_size)


def read_slates(path: str | Path) -> SlateBatch:
    """All slates of a file as one padded batch (empty batch for an empty file)."""
    slates = list(iter_slates(path))
    return SlateBatch.from_slates(slates) if slates else SlateBatch.empty()
