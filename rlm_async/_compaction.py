"""History compaction: when an agent's conversation nears its model's context window, the older turns are
summarised by the model and the full conversation is kept in the REPL variable ``history``, instead of
failing with an HTTP 400 for context length (what a llama.cpp slot answered after 14 turns).

The window of a model comes from ``RLM(context_windows={model: tokens})``, else from the endpoint's
``GET /models`` where the server reports it (vLLM, llama.cpp, OpenRouter; asked once), else from
:data:`KNOWN_WINDOWS` (the providers' published figures), else compaction is off for that model. The
conversation's size is estimated as characters / 4 (``rlm_async._budget.estimate_tokens``); compaction
starts at :data:`THRESHOLD` (0.85, the official RLM's ``compaction_threshold_pct`` default) of the window,
less the turn's ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._budget import estimate_tokens
from ._clients import Message

__all__ = ["KNOWN_WINDOWS", "SUMMARY_REQUEST", "compaction_point", "window_for"]

#: Context windows in tokens, as the providers publish them (OpenAI's model pages; Qwen2.5-Coder's model
#: card, as ``rlm-async local`` serves it with 32,768 tokens over 4 slots: 8,192 per slot).
KNOWN_WINDOWS: Mapping[str, int] = {
    "gpt-4.1": 1_047_576,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576,
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "gpt-5": 400_000,
    "gpt-5-mini": 400_000,
    "gpt-5-nano": 400_000,
    "qwen2.5-coder-0.5b-instruct": 8_192,
    "qwen2.5-coder-1.5b-instruct": 8_192,
}

#: The threshold, as a fraction of the window (the official RLM's default compaction_threshold_pct).
THRESHOLD = 0.85

SUMMARY_REQUEST = (
    "Your conversation is about to outgrow your context window. Summarise the work so far for yourself, in "
    "at most 300 words: what you have learned about the input, the REPL variables that hold your results "
    "(by name), what you tried that did not work, and what is left to do. Write only the summary, no code."
)


def window_for(model: str, windows: Mapping[str, int]) -> int | None:
    """The context window of ``model`` in tokens: the user's table first, then :data:`KNOWN_WINDOWS`
    (matched case-insensitively, also by a known name's prefix), else None."""
    if model in windows:
        return windows[model]
    lowered = model.lower().split("/")[-1]
    for name, window in KNOWN_WINDOWS.items():
        if lowered == name or lowered.startswith(name + "-") or lowered.startswith(name + "."):
            return window
    return None


def compaction_point(messages: list[Message], window: int | None, max_tokens: int | None) -> bool:
    """True when ``messages`` (plus a reply of ``max_tokens``) reach the threshold of ``window``."""
    if window is None or len(messages) < 5:  # nothing between the prompt and the latest turn to fold
        return False
    used = estimate_tokens(sum(len(m["content"]) for m in messages)) + (max_tokens or 0)
    return used >= THRESHOLD * window
