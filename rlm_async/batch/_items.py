"""A batch job's items and per-item results, and reading items from JSON lines."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._budget import UsageTotals
from .._errors import ConfigError

__all__ = ["BatchItem", "ItemResult", "ItemStatus", "coerce_items", "read_items"]

ItemStatus = Literal["done", "failed"]


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One item of a batch job: one ``RLM.completion(query, context)``.

    Attributes:
        id: the item's id, unique in the job (str). The results file is keyed by it: a rerun skips the ids
            it already holds.
        query: the question (str).
        context: the input (any picklable value), or None with ``context_path``.
        context_path: a text file read (UTF-8) where the item runs, instead of ``context``: on Ray, a path
            every node can read (shared storage). None with ``context``.
    """

    id: str
    query: str
    context: Any = None
    context_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"a batch item's id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.query, str):
            raise ConfigError(f"item {self.id!r}: query must be a str, got {type(self.query).__name__}")
        if self.context_path is not None and self.context is not None:
            raise ConfigError(f"item {self.id!r}: give context or context_path, not both")
        if self.context_path is not None and not isinstance(self.context_path, str):
            raise ConfigError(f"item {self.id!r}: context_path must be a str")

    def load_context(self) -> Any:
        """The item's context: ``context``, or the text of ``context_path``.

        Raises:
            OSError: ``context_path`` cannot be read.
        """
        if self.context_path is None:
            return self.context
        return Path(self.context_path).read_text(encoding="utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class ItemResult:
    """What became of one item: one line of the results file.

    Attributes:
        id: the item's id.
        status: ``"done"`` when the run answered (stop reason ``answer`` or ``max_iterations``), ``"failed"``
            otherwise. Both are final: a rerun with the same results file skips the item.
        answer: the answer, or the partial draft of a run that stopped early ("" when none ran).
        stop_reason: the run's :data:`~rlm_async.StopReason`, or, when no run produced a result:
            ``"worker_lost"`` (the Ray worker running it died on every one of ``max_item_attempts`` tries),
            ``"bad_input"`` (its ``context_path`` could not be read) or ``"error"`` (the engine raised, or Ray
            failed its call on every try).
        usage: the run's tree-wide usage (calls, tokens, USD).
        error: why the item did not answer (the typed error's text), or None.
        attempts: how many times the item was started (more than 1 after a Ray worker died under it or Ray
            failed its call).
        wall_s: seconds from the item's (last) start to its result.
    """

    id: str
    status: ItemStatus
    answer: str
    stop_reason: str
    usage: UsageTotals = field(default_factory=UsageTotals)
    error: str | None = None
    attempts: int = 1
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The results file's line for this item, as a dict of JSON values."""
        u = self.usage
        return {
            "id": self.id,
            "status": self.status,
            "answer": self.answer,
            "stop_reason": self.stop_reason,
            "usage": {
                "calls": u.calls,
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "cost_usd": u.cost_usd,
            },
            "error": self.error,
            "attempts": self.attempts,
            "wall_s": round(self.wall_s, 6),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ItemResult:
        """The inverse of :meth:`to_json`.

        Raises:
            ConfigError: ``data`` lacks a field or has one of the wrong type.
        """
        try:
            usage = data.get("usage") or {}
            status = data["status"]
            if status not in ("done", "failed"):
                raise ValueError(f"status {status!r}")
            return cls(
                id=str(data["id"]),
                status=status,
                answer=str(data.get("answer") or ""),
                stop_reason=str(data["stop_reason"]),
                usage=UsageTotals(
                    int(usage.get("calls", 0)),
                    int(usage.get("prompt_tokens", 0)),
                    int(usage.get("completion_tokens", 0)),
                    float(usage.get("cost_usd", 0.0)),
                ),
                error=None if data.get("error") is None else str(data["error"]),
                attempts=int(data.get("attempts", 1)),
                wall_s=float(data.get("wall_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"not a batch result: {exc}") from None

    @classmethod
    def failure(cls, item_id: str, stop_reason: str, error: str, *, attempts: int = 1) -> ItemResult:
        """A result for an item that no run finished (``worker_lost``, ``bad_input``, ``error``)."""
        return cls(item_id, "failed", "", stop_reason, UsageTotals(), error, attempts)


_ITEM_KEYS = frozenset({"id", "query", "context", "context_path"})


def _item_from(data: Any, where: str, base: Path | None) -> BatchItem:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: an item must be a JSON object, got {type(data).__name__}")
    missing = [k for k in ("id", "query") if k not in data]
    if missing:
        raise ConfigError(f"{where}: the item has no {' or '.join(missing)}")
    unknown = sorted(set(data) - _ITEM_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown} (an item has id, query, context or context_path)")
    item_id = data["id"]
    if isinstance(item_id, int) and not isinstance(item_id, bool):
        item_id = str(item_id)
    path = data.get("context_path")
    if isinstance(path, str) and base is not None and not Path(path).is_absolute():
        path = str(base / path)
    try:
        return BatchItem(item_id, data["query"], data.get("context"), path)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_items(path: str | Path) -> list[BatchItem]:
    """Read a batch's items from a JSON-lines file: one object a line with ``id`` (str or int), ``query``
    and ``context`` or ``context_path`` (relative paths are taken from the file's folder). Blank lines are
    skipped.

    Raises:
        ConfigError: the file cannot be read, a line is not a JSON object of that shape, or two items share
            an id (the message names the line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read batch input {str(path)!r}: {exc}") from None
    items: list[BatchItem] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
        items.append(_item_from(data, where, path.parent))
    return coerce_items(items)


def coerce_items(items: Iterable[BatchItem | Mapping[str, Any]]) -> list[BatchItem]:
    """Items as :class:`BatchItem`: dicts (the JSON-lines shape) are converted.

    Raises:
        ConfigError: an item of another type or shape, or two items with the same id.
    """
    out: list[BatchItem] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        if isinstance(item, Mapping):
            item = _item_from(dict(item), f"item {index}", None)
        elif not isinstance(item, BatchItem):
            raise ConfigError(f"item {index}: expected a BatchItem or a dict, got {type(item).__name__}")
        if item.id in seen:
            raise ConfigError(f"item {index}: id {item.id!r} is also item {seen[item.id]}; ids must be unique")
        seen[item.id] = index
        out.append(item)
    return out
