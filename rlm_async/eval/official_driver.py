"""Runs one eval item on the official ``rlms`` package (import ``rlm``); executed by *its* interpreter.

rlm_async never imports this file: ``rlm-async eval --engine official`` runs it with the python of a separate
virtual environment that has ``rlms`` installed (the benchmark's, ``rlm_async.bench.ensure_official_venv``).
The request is a JSON file (the context can be far longer than a command-line argument may be):
``{"query", "context", "model", "sub_model", "base_url", "api_key", "max_depth", "max_iterations",
"workers", "timeout_s", "max_budget", "sampling"}``. It prints one JSON line: ``answer``, ``ok``, ``error``,
``wall_s``, ``usage`` (``calls``, ``prompt_tokens``, ``completion_tokens``, ``cost_usd``) and ``turns`` (the
root's iterations begun, or null where this rlms has no ``RLM._completion_turn`` to count them by).

    python official_driver.py request.json
"""

import importlib
import json
import sys
import time
import traceback
from typing import Any


def _usage(result: Any) -> dict[str, Any]:
    summary = getattr(result, "usage_summary", None)
    models = getattr(summary, "model_usage_summaries", None) or {}
    cost = getattr(summary, "total_cost", None)
    return {
        "calls": sum(int(getattr(m, "total_calls", 0) or 0) for m in models.values()),
        "prompt_tokens": sum(int(getattr(m, "total_input_tokens", 0) or 0) for m in models.values()),
        "completion_tokens": sum(int(getattr(m, "total_output_tokens", 0) or 0) for m in models.values()),
        "cost_usd": float(cost) if cost is not None else 0.0,
    }


def _merged(messages: Any) -> Any:
    """Consecutive messages of one role merged into one, contents joined by a blank line."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if out and message.get("role") == out[-1].get("role") and isinstance(message.get("content"), str):
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{message['content']}"}
        else:
            out.append(dict(message))
    return out


def _merge_consecutive_roles() -> None:
    """rlms 0.1.3 sends two assistant messages in a row (a reply with no code block is recorded as an
    assistant message alone, ``rlm/utils/parsing.py``; its default-answer step appends one more), which
    llama.cpp's server refuses with HTTP 400 ("Cannot have 2 or more assistant messages at the end of the
    list"). Merging them before they are sent keeps every word and the order (docs/eval.md)."""
    from openai.resources.chat import completions

    for cls in (completions.Completions, completions.AsyncCompletions):
        original = cls.create

        def create(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            if "messages" in kwargs:
                kwargs["messages"] = _merged(kwargs["messages"])
            return __original(self, *args, **kwargs)

        cls.create = create


def _count_turns(rlm: Any, record: dict[str, Any]) -> None:
    """Count the root's iterations into ``record["turns"]``. rlms 0.1.3 takes an ``on_iteration_start``
    callback but never calls it, so this wraps the root instance's ``_completion_turn`` (one call an
    iteration, ``rlm/core/rlm.py``); children are other instances, so their iterations are not counted. The
    default-answer call after the last iteration is not an iteration."""
    turn = getattr(rlm, "_completion_turn", None)
    if turn is None:
        return

    def counted(*args: Any, **kwargs: Any) -> Any:
        record["turns"] += 1
        return turn(*args, **kwargs)

    try:
        rlm._completion_turn = counted
    except (AttributeError, TypeError):  # a version with slots or a read-only attribute: turns stay unknown
        return
    record["turns"] = 0


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        req = json.load(f)
    started = time.perf_counter()
    record: dict[str, Any] = {"ok": False, "answer": "", "error": None, "usage": {}, "turns": None}
    try:
        _merge_consecutive_roles()
        rlm_module = importlib.import_module("rlm")
        backend = {"model_name": req["model"], "base_url": req["base_url"], "api_key": req["api_key"]}
        kwargs: dict[str, Any] = {
            "backend": "openai",
            "backend_kwargs": backend,
            "environment": "local",
            "max_depth": req.get("max_depth", 1),
            "max_iterations": req.get("max_iterations", 30),
            "max_concurrent_subcalls": req.get("workers", 4),
        }
        if req.get("sub_model") and req["sub_model"] != req["model"]:
            kwargs["other_backends"] = ["openai"]
            kwargs["other_backend_kwargs"] = [{**backend, "model_name": req["sub_model"]}]
        for ours, theirs in (("timeout_s", "max_timeout"), ("max_budget", "max_budget"), ("sampling", "sampling_args")):
            if req.get(ours) is not None:
                kwargs[theirs] = req[ours]
        rlm = rlm_module.RLM(**kwargs)
        _count_turns(rlm, record)
        result = rlm.completion(req["context"], root_prompt=req["query"])
        record.update(ok=True, answer=str(getattr(result, "response", result)), usage=_usage(result))
    except Exception as exc:  # the comparison records the peer's failures too
        record["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    record["wall_s"] = time.perf_counter() - started
    print(json.dumps(record))


if __name__ == "__main__":
    main()
