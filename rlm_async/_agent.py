"""The agent loop: messages -> model -> ```repl cells -> REPL -> output -> ... -> answer.

An :class:`Agent` is also the :class:`~rlm_async._repl.Host` of its own REPL: ``llm_batch`` and
``rlm_batch`` from model code land here, on the engine's loop, and fan out through the run's one scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import re
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import anyio

from . import _prompts
from ._clients import ChatResponse, Message
from ._compaction import SUMMARY_REQUEST, compaction_point
from ._errors import (
    BudgetExceeded,
    ConfigError,
    EngineError,
    LLMCallError,
    RLMError,
    RunTimeout,
    ToolError,
    WorkerError,
)
from ._fanout import fan_out
from ._guards import FinishGate, Verdict, cut_reply, nudge_note, restate
from ._repl import Host, Outcome, ProcessRepl, ReplSession, ThreadRepl
from ._tools import call_tool
from ._trace import bound

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._budget import Limits
    from ._engine import Run
    from ._sandbox import WorkerPlan
    from ._tools import Tool

__all__ = ["CONFIG_STATUSES", "Agent", "AgentResult", "StopReason", "parse_code_blocks", "parse_text_final"]

StopReason = Literal[
    "answer", "max_iterations", "empty_answer", "timeout", "llm_error", "config_error", "error",
    "budget:max_calls", "budget:max_input_tokens", "budget:max_output_tokens", "budget:max_cost_usd",
    "budget:max_agents", "budget:max_fanout", "budget:max_errors",
]  # fmt: skip
StopReason.__doc__ = """How a run or an agent ended (a ``Literal``, so mypy catches a misspelled comparison).

``"answer"``: the model set ``answer["ready"]`` (or FINAL); ``"max_iterations"``: the last call gave the answer;
``"empty_answer"``: the model finished with an empty answer twice (the first time it is told and goes on);
``"budget:<Limits field>"``: a cap stopped it; ``"timeout"``: ``timeout_s`` or ``agent_timeout_s``;
``"llm_error"``: one of its own turns failed for good (endpoint down, retries spent); ``"config_error"``: the
endpoint refused the configuration (401, 403, or 404 for a configured model) for a turn or a sub-call, or a
model has no price under ``max_cost_usd``; ``"error"``: anything else (a worker that cannot start, an engine
bug).
"""
STOP_REASONS: frozenset[str] = frozenset(get_args(StopReason))
#: HTTP statuses that mean the configuration is wrong (key, permissions, model name), never the load.
CONFIG_STATUSES = frozenset({401, 403, 404})
Role = Literal["user", "assistant"]

_REPL_BLOCK = re.compile(r"```repl[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_BLOCK = re.compile(r"```(?:python|py)[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)
_ANY_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_TEXT_FINAL_VAR = re.compile(r"^\s*FINAL_VAR\((.*?)\)\s*$", re.MULTILINE)
_TEXT_FINAL = re.compile(r"^\s*FINAL\((.*)\)\s*$", re.MULTILINE | re.DOTALL)
_NAME = re.compile(r"^['\"]?([A-Za-z_]\w*)['\"]?$")


def parse_code_blocks(text: str) -> list[str]:
    """The code of every ```repl block in ``text``, in order; when there is none, of every ```python /
    ```py block (small models write those). A reply that has ```repl blocks keeps its ```python snippets as
    prose, as the official RLM does, which runs ```repl only.

    A block cut off at the end of the text (by a stop sequence or ``max_tokens``) is included as it stands.
    """
    blocks = [m.group(1) for m in _REPL_BLOCK.finditer(text) if m.group(1).strip()]
    return blocks or [m.group(1) for m in _PYTHON_BLOCK.finditer(text) if m.group(1).strip()]


def parse_text_final(text: str) -> tuple[str, str] | None:
    """``("var", name)`` for ``FINAL_VAR(name)`` (quoted or not), ``("text", value)`` for ``FINAL(answer)`` or
    for ``FINAL_VAR(<a literal>)`` written outside code blocks (the official RLM's text form), else None.
    The agent honours it after running the reply's code blocks, as the official RLM does."""
    prose = _ANY_BLOCK.sub("", text)
    if m := _TEXT_FINAL_VAR.search(prose):
        argument = m.group(1).strip()
        if name := _NAME.match(argument):
            return "var", name.group(1)
        return "text", argument.strip("'\"")
    if m := _TEXT_FINAL.search(prose):
        return "text", m.group(1).strip()
    return None


@dataclass(frozen=True, slots=True)
class AgentResult:
    """How one agent ended.

    Attributes:
        answer: the answer, or the partial draft (``answer["content"]``) when it stopped early.
        stop_reason: see :data:`StopReason`.
        iterations: model turns taken.
        error: the typed error when it stopped early (:class:`BudgetExceeded`, :class:`RunTimeout`,
            :class:`LLMCallError`, :class:`ConfigError`, :class:`WorkerError`, :class:`EngineError`), else None.
        history: the agent's conversation with its model (system prompt first), as far as it got.
    """

    answer: str
    stop_reason: StopReason
    iterations: int
    error: RLMError | None = None
    history: tuple[Message, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the agent produced an answer (not a partial one)."""
        return self.stop_reason in ("answer", "max_iterations")


class Agent:
    """One RLM agent at one depth of a run.

    Args:
        run: the run it belongs to (scheduler, ledger, tracer, limits, models).
        depth: 0 for the root.
        agent_id: dotted path from the root, e.g. ``"0.2.1"``.
    """

    def __init__(self, run: Run, depth: int, agent_id: str, *, model: str | None = None) -> None:
        self._run = run
        self._model = model
        self.depth = depth
        self.agent_id = agent_id
        self._children = itertools.count(1)
        self._repl: ReplSession | None = None
        self._iterations = 0
        self._holds_worker_slot = False
        self._lends = 0
        self.messages: list[Message] = []  # the conversation with the model, as far as it got

    @property
    def turns(self) -> int:
        """Model turns begun so far (a turn that was stopped part-way counts)."""
        return self._iterations

    @property
    def draft(self) -> str:
        """``answer["content"]`` as it stands now (the partial answer after a stop)."""
        return self._repl.answer()[0] if self._repl is not None else ""

    def _bound(self) -> Any:
        """Bind this agent's ids for events: host calls arrive from a REPL thread with no context of their own."""
        return bound(run_id=self._run.run_id, agent_id=self.agent_id, depth=self.depth)

    async def run(self, query: str, context: Any, *, repl: ReplSession | None = None, note: str = "") -> AgentResult:
        """Run the loop to an answer or a stop. Never raises for model, provider or budget trouble: those end
        in ``stop_reason``; cancellation propagates.

        Args:
            query, context: the task.
            repl: a REPL to use instead of a new one (a session's, which outlives this agent: it is neither
                entered nor closed here).
            note: appended to the first user message (a session's word on earlier turns).
        """
        run = self._run
        with self._bound():
            run.agent_started(self.depth)
            run.tracer.emit("agent_start", query=query[:500])
            timeout = run.limits.agent_timeout_s if self.depth else None
            try:
                with anyio.move_on_after(timeout) as deadline:
                    await self._take_worker_slot()
                    session = None
                    try:
                        self._repl = session = repl or self._new_repl(query, context)
                        async with contextlib.nullcontext(session) if repl else session:
                            result = await self._loop(session, query, context, note)
                    finally:  # an own REPL's worker may outlive it briefly (a start in flight): so does the slot
                        self._give_worker_slot(None if repl else session)
                if deadline.cancelled_caught:
                    assert run.limits.agent_timeout_s is not None
                    error = RunTimeout("agent_timeout_s", run.limits.agent_timeout_s)
                    result = AgentResult(self.draft, "timeout", self._iterations, error)
            except (WorkerError, ConfigError) as exc:
                reason: StopReason = "config_error" if isinstance(exc, ConfigError) else "error"
                result = AgentResult(self.draft, reason, self._iterations, exc)
            except Exception as exc:  # an engine bug must not take the whole tree down; it is recorded
                bug = EngineError(f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc)))
                bug.__cause__ = exc
                result = AgentResult(self.draft, "error", self._iterations, bug)
            result = dataclasses.replace(result, history=tuple(self.messages))
            if result.stop_reason.startswith("budget:"):
                run.tracer.emit("budget_stop", reason=result.stop_reason, error=str(result.error))
            run.tracer.emit(
                "agent_end", stop_reason=result.stop_reason, iterations=result.iterations, answer=result.answer[:500]
            )
            return result

    def _new_repl(self, query: str, context: Any) -> ReplSession:
        """A worker-process REPL under the run's sandbox plan, or an in-thread one for ``sandbox="none"``."""
        run = self._run
        tools = run.tools_for(self.depth)
        return make_repl(run.worker_plan, run.limits, tools, context, self, self.agent_id, query=query)

    async def _take_worker_slot(self) -> None:
        await self._run.worker_slots.acquire()
        self._holds_worker_slot = True

    def _give_worker_slot(self, after: ReplSession | None = None) -> None:
        """Give the ``max_workers`` slot back: now, or once the REPL ``after`` has no worker left."""
        if self._holds_worker_slot:
            self._holds_worker_slot = False
            if after is None:
                self._run.worker_slots.release()
            else:
                after.when_gone(self._run.worker_slots.release)

    @contextlib.asynccontextmanager
    async def _lend_worker_slot(self) -> AsyncIterator[None]:
        """While this agent's cell waits on child agents, its worker slot is theirs to use (``max_workers``):
        a tree wider than the cap then queues instead of deadlocking. Nested lends count as one."""
        self._lends += 1
        if self._lends == 1:
            self._give_worker_slot()
        try:
            yield
        finally:
            self._lends -= 1
            if self._lends == 0:
                await self._take_worker_slot()

    async def _loop(self, repl: ReplSession, query: str, context: Any, note: str = "") -> AgentResult:
        run, limits = self._run, self._run.limits
        messages: list[Message] = [
            {
                "role": "system",
                "content": run.system_prompt
                or _prompts.system_prompt(
                    depth=self.depth,
                    max_depth=limits.max_depth,
                    max_fanout=limits.max_fanout,
                    max_output_chars=limits.max_output_chars,
                    kind=_prompts.describe_kind(context),
                    tools=run.tools_for(self.depth),
                ),
            },
            {"role": "user", "content": _prompts.first_user_message(query, context) + note},
        ]
        self.messages = messages  # the whole conversation; `messages` is what is sent (compacted when long)

        def say(role: Role, content: str) -> None:
            message: Message = {"role": role, "content": content}
            messages.append(message)
            if self.messages is not messages:
                self.messages.append(message)

        model = self._model or run.model_for(self.depth)
        window = run.window_for(model)
        ran: dict[str, int] = {}  # code (whitespace-normalised) -> the turn that first ran it
        last_answer = ("", False)
        errors = 0  # consecutive turns that went wrong (Limits.max_errors)
        gate = FinishGate(query, early=limits.early_finish)
        for iteration in range(1, limits.max_iterations + 1):
            self._iterations = iteration
            last_turn = iteration == limits.max_iterations
            run.tracer.emit("turn", iteration=iteration)
            try:
                if compaction_point(messages, window, limits.max_tokens_per_turn):
                    messages = await self._compact(repl, messages)
                text = await self._reply(messages, say)
            except (BudgetExceeded, LLMCallError, ConfigError) as exc:
                return self._stopped(exc, iteration - 1)
            blocks = parse_code_blocks(text)
            final = parse_text_final(text)
            if not blocks and final is None:
                say("user", _prompts.NO_CODE_MESSAGE + self._last_turn_note(iteration, query, gate))
                errors += 1
                if limits.max_errors is not None and errors >= limits.max_errors:
                    return self._too_many_errors(errors, iteration)
                continue
            outputs = []
            turn_failed = False
            for index, code in enumerate(blocks, 1):
                run.tracer.emit("code", iteration=iteration, block=index, code=code)
                cell = await repl.run_cell(code)
                rendered = cell.render()
                first = ran.setdefault(" ".join(code.split()), iteration)
                if first != iteration:
                    rendered += _prompts.repeated_code_note(first)
                run.tracer.emit("output", iteration=iteration, block=index, output=rendered, error=cell.error)
                outputs.append(rendered)
                turn_failed = turn_failed or cell.failed
                gate.cell_ran(bool(cell.output.strip() or cell.error))
                content, ready = repl.answer()
                if (content, ready) != last_answer:
                    run.tracer.emit("answer", content=content[:4000], ready=ready, iteration=iteration)
                    last_answer = (content, ready)
                if ready:
                    verdict = self._judge(gate, content, last_turn)
                    if verdict.action == "accept":
                        return AgentResult(content, "answer", iteration)
                    if verdict.action == "empty":
                        return AgentResult("", "empty_answer", iteration)
                    await repl.unready()
                    last_answer = (content, False)
                    outputs[-1] += "\n" + verdict.note
                    break  # the rest of the reply was written expecting to be done
            if final is not None:  # FINAL / FINAL_VAR in the reply's prose: after its code has run
                kind, value = final
                answer = value if kind == "text" else await repl.final_var(value)
                if answer is None:
                    outputs.append(_prompts.missing_final_var(value))
                else:
                    verdict = self._judge(gate, answer, last_turn)
                    if verdict.action == "accept":
                        return AgentResult(answer, "answer", iteration)
                    if verdict.action == "empty":
                        return AgentResult("", "empty_answer", iteration)
                    outputs.append(verdict.note)
            errors = errors + 1 if turn_failed else 0
            if limits.max_errors is not None and errors >= limits.max_errors:
                return self._too_many_errors(errors, iteration)
            say("user", _prompts.format_outputs(outputs) + self._last_turn_note(iteration, query, gate))
            gate.outputs_shown()
        say("user", _prompts.final_answer_prompt(self.draft, query, gate.form))
        try:
            if compaction_point(messages, window, limits.max_tokens_per_turn):
                messages = await self._compact(repl, messages)
            text = (await self._turn(messages, stop=())).text
        except (BudgetExceeded, LLMCallError, ConfigError) as exc:
            return self._stopped(exc, limits.max_iterations)
        say("assistant", text)
        return AgentResult(text.strip(), "max_iterations", limits.max_iterations + 1)

    async def _reply(self, messages: list[Message], say: Callable[[Role, str], None]) -> str:
        """One model turn, with one nudge when the reply came back empty or cut inside a code block: the model
        is told what happened and asked again, and the turn is not spent on it. Both replies join the
        conversation; the second stands as it is."""
        stop = _prompts.STOP_SEQUENCES
        response = await self._turn(messages, stop=stop)
        why = cut_reply(response.text, response.finish_reason, response.completion_tokens)
        if why is None:
            say("assistant", response.text)
            return response.text
        self._run.tracer.emit(
            "nudge",
            why=why,
            finish_reason=response.finish_reason,
            completion_tokens=response.completion_tokens,
            stop_sequence=response.stop_sequence,
            stop_sequences=list(stop),
        )
        note = nudge_note(why, stop, self._run.limits.max_tokens_per_turn)
        if response.text.strip():
            say("assistant", response.text)
            say("user", note)
        else:  # no empty assistant message: the note joins the last user message (some servers refuse both)
            last = messages[-1]
            messages[-1] = {"role": last["role"], "content": f"{last['content']}\n\n{note}"}
            if self.messages is not messages:
                self.messages[-1] = messages[-1]
        text = (await self._turn(messages, stop=stop)).text
        say("assistant", text)
        return text

    def _last_turn_note(self, iteration: int, query: str, gate: FinishGate) -> str:
        """The restated query, appended to the message before the agent's last turn with the REPL."""
        return "\n" + restate(query, gate.form) if iteration + 1 == self._run.limits.max_iterations else ""

    def _judge(self, gate: FinishGate, answer: str, last_turn: bool) -> Verdict:
        verdict = gate.judge(answer, last_turn=last_turn)
        if verdict.check is not None:
            event = "finish_refused" if verdict.action == "refuse" else "finish_warned"
            self._run.tracer.emit(event, check=verdict.check, answer=answer[:500])
        return verdict

    async def _compact(self, repl: ReplSession, messages: list[Message]) -> list[Message]:
        """Fold the turns between the first prompt and the latest one into a summary the model writes, and put
        the whole conversation in the REPL variable ``history`` (see ``rlm_async._compaction``)."""
        summary = (await self._turn([*messages, {"role": "user", "content": SUMMARY_REQUEST}], stop=())).text
        await repl.set_variables({"history": [dict(m) for m in self.messages]})
        first = messages[1]
        merged: Message = {"role": "user", "content": first["content"] + _prompts.compacted_note(summary)}
        compacted = [messages[0], merged, *messages[-2:]]
        self._run.tracer.emit(
            "compaction",
            chars_before=sum(len(m["content"]) for m in messages),
            chars_after=sum(len(m["content"]) for m in compacted),
            turns_folded=(len(messages) - 4) // 2,
        )
        return compacted

    async def _turn(self, messages: list[Message], *, stop: tuple[str, ...]) -> ChatResponse:
        limits = self._run.limits
        request = self._run.request(
            self._model or self._run.model_for(self.depth),
            tuple(messages),
            self.depth,
            stop=stop,
            max_tokens=limits.max_tokens_per_turn,
        )
        response = await self._run.scheduler.call(request, depth=self.depth, agent_id=self.agent_id)
        self._run.tracer.emit("reply", text=response.text[:4000], finish_reason=response.finish_reason)
        return response

    def _too_many_errors(self, errors: int, iterations: int) -> AgentResult:
        assert self._run.limits.max_errors is not None
        error = BudgetExceeded("max_errors", self._run.limits.max_errors, errors, detail="consecutive failed turns")
        return AgentResult(self.draft, "budget:max_errors", iterations, error)

    def _stopped(self, exc: BudgetExceeded | LLMCallError | ConfigError, iterations: int) -> AgentResult:
        reason: str
        if isinstance(exc, BudgetExceeded):
            reason = f"budget:{exc.limit}"
        elif isinstance(exc, LLMCallError):
            reason = "config_error" if exc.status in CONFIG_STATUSES else "llm_error"
        else:
            reason = "config_error"
        assert reason in STOP_REASONS, reason
        return AgentResult(self.draft, reason, iterations, exc)  # type: ignore[arg-type]

    # -- Host: what this agent's REPL may ask of the engine --------------------------------------------
    async def llm_batch(self, prompts: list[str], model: str | None, max_tokens: int | None) -> list[Outcome]:
        """Plain sub-model calls at depth + 1, concurrently; outcomes in prompt order.

        Raises:
            BudgetExceeded: at once for ``max_fanout`` or ``max_calls`` (nothing started); after the batch
                when a token or USD cap refused some items (``results`` holds every outcome).
        """
        with self._bound():
            return await self._llm_batch(prompts, model, max_tokens)

    async def _llm_batch(self, prompts: list[str], model: str | None, max_tokens: int | None) -> list[Outcome]:
        ledger = self._run.ledger
        ledger.check_fanout(len(prompts))
        ledger.reserve_calls(len(prompts))
        depth = self.depth + 1
        configured = self._run.model_for(depth)
        model = model or configured  # a model named by model code may be wrong: its 404 is the model's to see
        results: list[Outcome] = [{} for _ in prompts]
        refused: list[BudgetExceeded] = []
        max_tokens = max_tokens or self._run.limits.max_tokens_per_subcall
        template = self._run.request(model, (), depth, max_tokens=max_tokens)  # sampling resolved once a batch
        started = 0

        async def one(index: int, prompt: str) -> None:
            nonlocal started
            started += 1  # from here the scheduler owns this call's reservation (and refunds it if unsent)
            request = template.with_messages(({"role": "user", "content": prompt},))
            try:
                response = await self._run.scheduler.call(request, depth=depth, agent_id=self.agent_id, reserved=True)
            except BudgetExceeded as exc:
                refused.append(exc)
                results[index] = _failure("budget_exceeded", str(exc))
            except LLMCallError as exc:
                results[index] = _failure(exc.kind, str(exc))
                if exc.status in (401, 403) or (exc.status == 404 and model == configured):
                    self._run.fail(exc)  # a wrong key or configured model fails every call alike: stop the run
            except ConfigError as exc:
                results[index] = _failure("config", str(exc))
            except Exception as exc:  # G1: an engine or client bug still gives this prompt a typed outcome
                self._run.tracer.emit("call_crashed", error="".join(traceback.format_exception(exc)))
                results[index] = _failure("error", f"{type(exc).__name__}: {exc}")
            else:
                results[index] = {"ok": True, "text": response.text}

        try:
            await fan_out(prompts, one, self._run.scheduler.concurrency)
        finally:  # cancelled mid-batch: the calls no lane reached give their reservations back
            ledger.refund_calls(len(prompts) - started)
        if refused:
            first = refused[0]
            raise BudgetExceeded(
                first.limit,
                first.cap,
                first.used,
                detail=f"{len(refused)} of {len(prompts)} prompts refused; the others' results are in .results",
                results=results,
            )
        return results

    async def rlm_batch(self, queries: list[str], contexts: list[Any], model: str | None = None) -> list[Outcome]:
        """One child agent per (query, context) at depth + 1, concurrently, with ``model`` for its own turns
        (None: the run's model for that depth); outcomes in order.

        At ``max_depth`` each child falls back to one plain LLM call with the query and the context in its
        prompt (the prompt alone when the context is the query, as ``rlm_query(p)`` passes it), recorded as an
        ``agent_fallback`` event.

        Raises:
            BudgetExceeded: at once for ``max_fanout`` or ``max_agents`` (nothing started).
        """
        with self._bound():
            return await self._rlm_batch(queries, contexts, model)

    async def _rlm_batch(self, queries: list[str], contexts: list[Any], model: str | None) -> list[Outcome]:
        run = self._run
        run.ledger.check_fanout(len(queries))
        depth = self.depth + 1
        if depth >= run.limits.max_depth:
            run.fallbacks += len(queries)
            run.tracer.emit("agent_fallback", count=len(queries), reason="max_depth", child_depth=depth)
            prompts = [_fallback_prompt(q, c) for q, c in zip(queries, contexts, strict=True)]
            return await self._llm_batch(prompts, model, None)
        run.ledger.reserve_agents(len(queries))
        results: list[Outcome] = [{} for _ in queries]

        async def child(index: int, query: str, context: Any) -> None:
            agent = Agent(run, depth, f"{self.agent_id}.{next(self._children)}", model=model)
            outcome = await agent.run(query, context)
            if outcome.ok:
                results[index] = {"ok": True, "text": outcome.answer}
            else:
                results[index] = _failure(outcome.stop_reason, str(outcome.error or ""), outcome.answer)

        async with self._lend_worker_slot(), asyncio.TaskGroup() as tg:
            for index, (query, context) in enumerate(zip(queries, contexts, strict=True)):
                tg.create_task(child(index, query, context))
        return results

    async def tool(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Call this agent's custom tool ``name`` in the engine process (see ``rlm_async._tools``).

        Raises:
            ToolError: no such callable tool, or it raised (the original is the cause).
        """
        tool = self._run.tools_for(self.depth).get(name)
        if tool is None or not tool.callable:
            raise ToolError(f"there is no custom tool named {name!r}")
        with self._bound():
            self._run.tracer.emit("tool_call", tool=name)
            try:
                return await call_tool(tool.value, args, kwargs)
            except Exception as exc:
                raise ToolError(f"tool {name!r} raised {type(exc).__name__}: {exc}") from exc

    def budget(self) -> dict[str, Any]:
        """What is left: calls, agents, tokens, USD, seconds (None: no cap), and the depth picture."""
        run = self._run
        left: dict[str, Any] = dict(run.ledger.remaining())
        left["seconds"] = run.seconds_left()
        left["depth"] = self.depth
        left["max_depth"] = run.limits.max_depth
        left["can_spawn_agents"] = self.depth + 1 < run.limits.max_depth
        left["max_fanout"] = run.limits.max_fanout
        return left


def make_repl(
    plan: WorkerPlan | None,
    limits: Limits,
    tools: Mapping[str, Tool],
    context: Any,
    host: Host,
    name: str,
    *,
    query: str | None = None,
) -> ReplSession:
    """A REPL for one agent: a worker process under ``plan``, or in-thread when ``plan`` is None (the
    ``"none"`` sandbox); callable tools become proxies, tool values are copied in, and ``query`` becomes the
    variable ``query`` (unless a custom tool has that name)."""
    common: dict[str, Any] = {
        "context": context,
        "host": host,
        "max_output_chars": limits.max_output_chars,
        "cell_timeout_s": limits.cell_timeout_s,
        "name": name,
        "tools": tuple(tool_name for tool_name, tool in tools.items() if tool.callable),
        "values": {tool_name: tool.value for tool_name, tool in tools.items() if not tool.callable},
    }
    if query is not None:
        common["values"].update(query_variable(query, tools))
    if plan is None:
        return ThreadRepl(**common)
    return ProcessRepl(plan=plan, **common)


def query_variable(query: str, tools: Mapping[str, Tool]) -> dict[str, str]:
    """The REPL variable ``query`` (the system prompt's example builds its sub-prompts from it), unless a
    custom tool has that name."""
    return {} if "query" in tools else {"query": query}


def _failure(kind: str, message: str, partial: str = "") -> Outcome:
    outcome: Outcome = {"ok": False, "kind": kind, "message": message}
    if partial:
        outcome["partial"] = partial
    return outcome


def _fallback_prompt(query: str, context: Any) -> str:
    if context is None or context == "" or (isinstance(context, str) and context == query):
        return query  # rlm_query(p) passes p as both: sending it twice would double the tokens
    return f"{query}\n\nInput:\n{context if isinstance(context, str) else repr(context)}"
