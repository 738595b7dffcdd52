"""The functions model code sees in its REPL, and how one name serves both ``await f(x)`` and ``f(x)``.

**One name, two forms.** Each sub-call function looks at the frame that called it (skipping comprehension
frames, which Python 3.11 gives their own code object, and lambdas):

- called from a coroutine (an ``async def``, or a cell with a top-level ``await``), it returns a real
  coroutine, so ``await llm_query(p)``, ``asyncio.gather(*(llm_query(p) for p in ps))``,
  ``asyncio.create_task(llm_query(p))`` and ``TaskGroup.create_task(...)`` all work; nothing is sent until
  the coroutine starts;
- called from plain code (a cell without ``await``, or a plain ``def`` the model wrote), it blocks *its own
  thread* until the result is in and returns it, as the official ``rlms`` REPL does. The engine's event
  loop never blocks: the work runs there, the cell only waits.

A coroutine that is never started is reported to the model at the end of the cell (and closed), so the one
confusing case (``x = llm_query(p)`` without ``await`` inside async code) is explained instead of silently
yielding an object.

Standard library only: the sandboxed worker process loads this file by path, without the engine.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Future
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._protocol import Outcome

__all__ = ["ReplFunctions", "SubcallFailure"]

_UNSET: Any = object()

_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR
#: Frames that take their form from the code around them: ``asyncio.gather(*map(lambda p: llm_query(p), ps))``
#: and ``[llm_query(p) for p in ps]`` inside async code hand out coroutines.
_TRANSPARENT = frozenset({"<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>", "<lambda>"})


class SubcallFailure(str):
    """A failed sub-call, standing in its answer's place: a str that reads ``"Error: <kind>: <message>"``, so
    code written for the official RLM (``'GOT ' + r``, ``' | '.join(answers)``) keeps working, but falsy,
    and ``is_failure(x)`` / ``isinstance(x, SubcallFailure)`` tell it from an answer.

    Attributes:
        kind: why, in one word: ``"rate_limited"``, ``"timeout"``, ``"status"``, ``"connection"``,
            ``"bad_response"``, ``"retry_after_too_long"``, ``"budget_exceeded"``, a child agent's stop
            reason (``"max_iterations"``, ``"budget:max_calls"``, ...) or ``"error"``.
        message: the details.
        partial: a child agent's partial answer when it stopped early with one, else "".
    """

    kind: str
    message: str
    partial: str

    def __new__(cls, kind: str, message: str, partial: str = "") -> SubcallFailure:
        self = super().__new__(cls, f"Error: {kind}: {message}")
        self.kind = kind
        self.message = message
        self.partial = partial
        return self

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        extra = f", partial={self.partial[:80]!r}" if self.partial else ""
        return f"SubcallFailure(kind={self.kind!r}, message={self.message!r}{extra})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (SubcallFailure, (self.kind, self.message, self.partial))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SubcallFailure):
            return (self.kind, self.message, self.partial) == (other.kind, other.message, other.partial)
        return str.__eq__(self, other)

    def __hash__(self) -> int:
        return str.__hash__(self)


def to_model_value(outcome: Outcome) -> str | SubcallFailure:
    """An outcome dict as model code sees it: the answer str, or a SubcallFailure."""
    if outcome.get("ok"):
        return outcome.get("text", "")
    return SubcallFailure(outcome.get("kind", "error"), outcome.get("message", ""), outcome.get("partial", ""))


def _caller_is_async(frame: FrameType | None) -> bool:
    while frame is not None and frame.f_code.co_name in _TRANSPARENT:
        frame = frame.f_back
    return frame is not None and bool(frame.f_code.co_flags & _ASYNC_FLAGS)


Submit = Callable[..., Future[Any]]


class ReplFunctions:
    """Builds the reserved names of one REPL namespace.

    Args:
        submit: ``submit(method, *args)`` starts ``Host.<method>(*args)`` on the engine's loop and returns a
            concurrent Future of its result (a list of outcome dicts).
        call: ``call(method)`` runs the synchronous ``Host.<method>()`` on the engine's loop, blocking.
        namespace: the REPL globals, for ``FINAL_VAR``.
        budget_error: the exception class a refused batch raises in model code (``BudgetExceeded``); its
            ``results`` (outcome dicts) are turned into model values on the way.
        answer: the dict model code sees as ``answer`` (default a plain ``{"content": "", "ready": False}``;
            the worker passes one that reports every change to the engine).
        tool_error: the exception class a failing custom tool raises in model code (``ToolError``).
    """

    def __init__(
        self,
        submit: Submit,
        call: Callable[[str], Any],
        namespace: dict[str, Any],
        budget_error: type[Exception],
        answer: dict[str, Any] | None = None,
        tool_error: type[Exception] = RuntimeError,
    ) -> None:
        self._submit = submit
        self._call = call
        self._ns = namespace
        self._budget_error = budget_error
        self._tool_error = tool_error
        #: coroutines handed to async code in the current cell, with their labels (see ``unawaited_note``)
        self._handed_out: dict[Coroutine[Any, Any, Any], str] = {}
        self._reserved: dict[str, Any] = {}
        self._answer_value: Any = _UNSET  # what model code last bound to the name `answer`, if not a dict
        self.answer: dict[str, Any] = {"content": "", "ready": False} if answer is None else answer

    def build(self, context: Any, tools: Iterable[str] = (), values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The reserved names, bound to this session: the engine owns them, and model code that rebinds one
        gets it back after the cell (:meth:`restore_reserved`). ``tools``: names of the custom tools the
        engine calls (each gets a proxy here); ``values``: custom tool values, copied in as they are."""
        self._reserved = {
            "context": context,
            "answer": self.answer,
            "llm_query": self.llm_query,
            "llm_batch": self.llm_batch,
            "llm_query_batched": self.llm_batch,
            "rlm_agent": self.rlm_agent,
            "rlm_batch": self.rlm_batch,
            "rlm_query": self.rlm_query,
            "rlm_query_batched": self.rlm_query_batched,
            "budget": self.budget,
            "FINAL": self.FINAL,
            "FINAL_VAR": self.FINAL_VAR,
            "SHOW_VARS": self.SHOW_VARS,
            "SubcallFailure": SubcallFailure,
            "BudgetExceeded": self._budget_error,
            "is_failure": is_failure,
            "ToolError": self._tool_error,
            **{name: self._tool_proxy(name) for name in tools},
            **(values or {}),
        }
        return dict(self._reserved)

    def _tool_proxy(self, name: str) -> Callable[..., Any]:
        """A stand-in for the engine-side tool ``name``: same dual form as ``llm_query``."""

        def tool(*args: Any, **kwargs: Any) -> Any:
            start = lambda: self._submit("tool", name, list(args), dict(kwargs))  # noqa: E731
            return self._dual(name, sys._getframe(1), start, lambda value: value)

        tool.__name__ = tool.__qualname__ = name
        tool.__doc__ = f"The custom tool {name!r}; it runs outside the REPL (await it in async code)."
        return tool

    def next_turn(self, context: Any, keep: Any) -> None:
        """A session's next turn: an empty answer, and ``context`` as the new reserved ``context`` unless it
        is ``keep``."""
        self.answer.update(content="", ready=False)
        self._answer_value = _UNSET
        if context is not keep:
            self._reserved["context"] = self._ns["context"] = context

    def restore_reserved(self) -> list[str]:
        """Put back every reserved name model code rebound or deleted; one note per name for the model.

        ``answer`` rebound to a dict with ``content`` / ``ready`` is adopted (``answer = {"content": x,
        "ready": True}`` ends the run, as in the official RLM); rebound to anything else, the value is kept
        for ``FINAL_VAR("answer")`` and the dict is put back.
        """
        notes = []
        for name, original in self._reserved.items():
            value = self._ns.get(name, _UNSET)
            if value is original:
                continue
            self._ns[name] = original
            if name == "answer" and isinstance(value, dict) and {"content", "ready"} & set(value):
                self.answer.update(
                    content=value.get("content", self.answer.get("content", "")),
                    ready=bool(value.get("ready", self.answer.get("ready", False))),
                )
                continue
            if name == "answer" and value is not _UNSET:
                self._answer_value = value
            hint = ' (set answer["content"] and answer["ready"] instead)' if name == "answer" else ""
            notes.append(f"`{name}` is reserved by the engine and was restored{hint}")
        return notes

    # -- the dual-form machinery ----------------------------------------------------------------------
    def _dual(self, label: str, frame: FrameType | None, start: Callable[[], Future[Any]], convert: Any) -> Any:
        if _caller_is_async(frame):
            coro = self._awaitable(start, convert)
            # What print(coro) shows when the model forgot the await:
            coro.__qualname__ = f"{label}(...): not awaited yet; write `await {label}(...)`"  # type: ignore[attr-defined]
            self._handed_out[coro] = label
            return coro
        try:
            value = start().result()
        except self._budget_error as exc:
            _convert_results(exc)
            raise
        return convert(value)

    async def _awaitable(self, start: Callable[[], Future[Any]], convert: Callable[[Any], Any]) -> Any:
        try:
            value = await asyncio.wrap_future(start())
        except self._budget_error as exc:
            _convert_results(exc)
            raise
        return convert(value)

    def unawaited_note(self) -> str | None:
        """At the end of a cell: a note naming the sub-calls that were created in async code but never
        awaited (so never sent), or None. Closes them, so Python does not warn about them later."""
        unstarted = {
            c: label for c, label in self._handed_out.items() if inspect.getcoroutinestate(c) == "CORO_CREATED"
        }
        for coro in unstarted:
            coro.close()
        self._handed_out.clear()
        never = sorted(set(unstarted.values()))
        if not never:
            return None
        shown = "; ".join(f"<pending {label}(...): not awaited yet; write `await {label}(...)`>" for label in never)
        return (
            f"{len(never)} kind(s) of sub-call were created inside async code but never awaited, so they did "
            f"not run: {shown}"
        )

    # -- plain LLM calls ------------------------------------------------------------------------------
    def llm_batch(self, prompts: Iterable[str], *, model: str | None = None, max_tokens: int | None = None) -> Any:
        """``await llm_batch(prompts)`` -> list of str (or SubcallFailure) in prompt order, run concurrently."""
        items = _str_list("llm_batch", "prompts", prompts)
        _check_max_tokens(max_tokens)
        return self._dual(
            "llm_batch",
            sys._getframe(1),
            lambda: self._submit("llm_batch", items, model, max_tokens),
            _to_model_list,
        )

    def llm_query(self, prompt: str, *, model: str | None = None, max_tokens: int | None = None) -> Any:
        """``await llm_query(prompt)`` -> str (or SubcallFailure)."""
        if not isinstance(prompt, str):
            raise TypeError(f"llm_query takes one prompt str, got {type(prompt).__name__}")
        _check_max_tokens(max_tokens)
        return self._dual(
            "llm_query",
            sys._getframe(1),
            lambda: self._submit("llm_batch", [prompt], model, max_tokens),
            _first,
        )

    # -- child agents ---------------------------------------------------------------------------------
    def rlm_batch(self, queries: Iterable[str], contexts: Sequence[Any], *, model: str | None = None) -> Any:
        """``await rlm_batch(queries, contexts)`` -> list of child answers (or SubcallFailure), in order.
        ``model``: the children's own model (default: the run's model for their depth)."""
        qs = _str_list("rlm_batch", "queries", queries)
        if isinstance(contexts, str | bytes) or not isinstance(contexts, Sequence):
            raise TypeError("rlm_batch takes a list of contexts, one per query")
        if len(contexts) != len(qs):
            raise ValueError(f"rlm_batch got {len(qs)} queries but {len(contexts)} contexts")
        _check_model(model)
        ctxs = list(contexts)
        return self._dual(
            "rlm_batch", sys._getframe(1), lambda: self._submit("rlm_batch", qs, ctxs, model), _to_model_list
        )

    def rlm_agent(self, query: str, context: Any, *, model: str | None = None) -> Any:
        """``await rlm_agent(query, context)`` -> the child agent's answer str (or SubcallFailure)."""
        if not isinstance(query, str):
            raise TypeError(f"rlm_agent takes a query str, got {type(query).__name__}")
        _check_model(model)
        return self._dual(
            "rlm_agent", sys._getframe(1), lambda: self._submit("rlm_batch", [query], [context], model), _first
        )

    def rlm_query(self, prompt: str, *, model: str | None = None) -> Any:
        """The official rlms name: a child agent whose query and context are both ``prompt``."""
        if not isinstance(prompt, str):
            raise TypeError(f"rlm_query takes one prompt str, got {type(prompt).__name__}")
        _check_model(model)
        return self._dual(
            "rlm_query", sys._getframe(1), lambda: self._submit("rlm_batch", [prompt], [prompt], model), _first
        )

    def rlm_query_batched(self, prompts: Iterable[str], *, model: str | None = None) -> Any:
        """The official rlms name: one child agent per prompt (query and context both the prompt)."""
        items = _str_list("rlm_query_batched", "prompts", prompts)
        _check_model(model)
        return self._dual(
            "rlm_query_batched",
            sys._getframe(1),
            lambda: self._submit("rlm_batch", items, list(items), model),
            _to_model_list,
        )

    # -- the rest ------------------------------------------------------------------------------------
    def budget(self) -> dict[str, Any]:
        """What is left of the run's caps: calls, agents, tokens, USD, seconds, depth (None: no cap)."""
        result: dict[str, Any] = self._call("budget")
        return result

    def FINAL(self, value: Any) -> None:
        """Set ``answer["content"] = str(value)`` and end the run."""
        self.answer["content"] = str(value)
        self.answer["ready"] = True

    def FINAL_VAR(self, name: Any) -> None:
        """End the run with ``str()`` of the REPL variable named ``name``; given a value that is not a
        variable name (``FINAL_VAR(123)``, ``FINAL_VAR(totals)``), with ``str()`` of that value, as the
        official RLM does.

        Raises:
            NameError: ``name`` is a str that looks like a variable name, and there is no such variable.
        """
        if not isinstance(name, str):
            self.FINAL(name)
            return
        text = self.variable_text(name)
        if text is None:
            raise NameError(f"FINAL_VAR: no variable named {name!r} in the REPL; SHOW_VARS() lists them")
        self.FINAL(text)

    def variable_text(self, name: str) -> str | None:
        """``str()`` of a REPL variable, or None when there is none. ``"answer"`` is the draft, or the value
        model code last bound to the name ``answer`` (the official RLM's older dialect)."""
        if name == "answer":
            return str(self._answer_value) if self._answer_value is not _UNSET else str(self.answer.get("content", ""))
        if name not in self._ns:
            return None
        return str(self._ns[name])

    def user_variables(self) -> list[str]:
        """The names model code defined: not reserved, not private, not modules (the official RLM lists them
        after each cell as ``REPL variables: [...]``)."""
        return [
            name
            for name, value in self._ns.items()
            if name not in self._reserved and not name.startswith("_") and not isinstance(value, ModuleType)
        ]

    def SHOW_VARS(self) -> str:
        """The user variables with their types, as one line (the official RLM's ``SHOW_VARS()``)."""
        shown = ", ".join(f"{n} ({type(self._ns[n]).__name__})" for n in self.user_variables())
        return f"REPL variables: {shown or '(none yet)'}"


def _convert_results(exc: Exception) -> None:
    results = getattr(exc, "results", ())
    exc.results = [to_model_value(o) if isinstance(o, dict) else o for o in results]  # type: ignore[attr-defined, arg-type]


def is_failure(value: object) -> bool:
    """True when ``value`` is a SubcallFailure (a failed sub-call), False for an answer."""
    return isinstance(value, SubcallFailure)


def _str_list(fn: str, what: str, items: Iterable[str]) -> list[str]:
    hint = " (for one prompt use llm_query)" if fn == "llm_batch" else ""
    if isinstance(items, str | bytes | Mapping):
        raise TypeError(f"{fn} takes a list of str {what}, got {type(items).__name__}{hint}")
    try:
        out = list(items)
    except TypeError:
        raise TypeError(f"{fn} takes a list of str {what}, got {type(items).__name__}{hint}") from None
    for i, item in enumerate(out):
        if not isinstance(item, str):
            raise TypeError(f"{fn}: {what}[{i}] is {type(item).__name__}, not str")
    return out


def _check_model(model: str | None) -> None:
    if model is not None and (not isinstance(model, str) or not model):
        raise TypeError(f"model must be a model name str, got {model!r}"[:200])


def _check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and (not isinstance(max_tokens, int) or not 1 <= max_tokens <= 1 << 24):
        raise ValueError(f"max_tokens must be an int from 1 to {1 << 24:,}, got {max_tokens!r}"[:200])


def _to_model_list(outcomes: list[Outcome]) -> list[str | SubcallFailure]:
    return [to_model_value(o) for o in outcomes]


def _first(outcomes: list[Outcome]) -> str | SubcallFailure:
    return to_model_value(outcomes[0])
