"""Custom tools: the user's functions and values in the REPL (the official RLM's ``custom_tools``).

A callable tool runs in the engine process, never in the worker: model code calls a proxy of the same name,
which sends the arguments (plain data) through the REPL channel, and the engine calls the function, so a tool
can hold a database connection or a key that model code never sees. ``async def`` tools are awaited; plain
ones run in a thread, so a blocking tool never stalls the engine. A value (a table, a config dict) is copied
into the REPL with ``context``.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError

__all__ = ["Tool", "normalise_tools"]

#: Names the REPL owns; a tool cannot take one.
RESERVED = frozenset({
    "context", "answer", "llm_query", "llm_batch", "llm_query_batched", "rlm_agent", "rlm_batch", "rlm_query",
    "rlm_query_batched", "budget", "FINAL", "FINAL_VAR", "SHOW_VARS", "SubcallFailure", "BudgetExceeded",
    "ToolError", "is_failure",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class Tool:
    """One custom tool.

    Attributes:
        value: a callable (sync or ``async def``), called in the engine process, or a value copied into the
            REPL (it must pickle).
        description: shown to the model in the system prompt.
    """

    value: Any
    description: str = ""

    @property
    def callable(self) -> bool:
        return callable(self.value)

    def signature(self) -> str:
        """``name(args)`` text for the prompt (``(...)`` when the signature cannot be read)."""
        try:
            return str(inspect.signature(self.value, eval_str=True))
        except (TypeError, ValueError, NameError):
            try:
                return str(inspect.signature(self.value))
            except (TypeError, ValueError):
                return "(...)"


def normalise_tools(tools: Mapping[str, Any] | None, what: str = "custom_tools") -> dict[str, Tool]:
    """``custom_tools`` as ``{name: Tool}``. A value may be a :class:`Tool`, a ``{"tool": x, "description":
    "..."}`` dict (the official RLM's form), a callable, or any other value.

    Raises:
        ConfigError: a name that is not an identifier or is reserved by the REPL.
    """
    out: dict[str, Tool] = {}
    for name, spec in (tools or {}).items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            raise ConfigError(f"{what}: {name!r} is not a usable Python name")
        if name in RESERVED:
            raise ConfigError(f"{what}: {name!r} is a name the REPL reserves")
        if isinstance(spec, Tool):
            out[name] = spec
        elif isinstance(spec, Mapping) and "tool" in spec:
            out[name] = Tool(spec["tool"], str(spec.get("description", "")))
        else:
            out[name] = Tool(spec)
    return out


async def call_tool(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Call a tool: ``async def`` tools awaited, plain ones in a worker thread (a blocking tool never stalls
    the engine's loop); an awaitable result is awaited."""
    import functools

    import anyio

    if inspect.iscoroutinefunction(fn):
        result = await fn(*args, **kwargs)
    else:
        result = await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
    if inspect.isawaitable(result):
        result = await result
    return result
