"""The message protocol between the engine and a REPL worker process (version 1).

Standard library only: the worker loads this file by path and never imports the engine.

**Framing.** Each message is one frame on a Unix socketpair: a 4-byte big-endian length, then that many bytes
of UTF-8 JSON holding one object with an ``"op"`` field. A frame from a worker longer than
:data:`MAX_FRAME_BYTES` (16 MiB) is a protocol violation; the engine's own frames may be up to
:data:`ENGINE_FRAME_BYTES`. The engine never unpickles anything the worker sends; the worker is untrusted once
model code has run, so the engine checks the shape of every message it reads (:func:`check_worker_message`).

**Engine -> worker** (the worker trusts these):

=============  ==================================================================================
``cell``       ``{"op": "cell", "id": int, "code": str}``: run one cell
``reply``      ``{"op": "reply", "id": int, "ok": true, "value": ...}`` or ``{"op": "reply", "id": int,
               "ok": false, "error": {"type": "BudgetExceeded" | "ToolError" | "Error", "message": str,
               ...}}``: the answer to a worker's ``call``
``get_var``    ``{"op": "get_var", "id": int, "name": str}``: ``str()`` of one REPL variable
``turn``       ``{"op": "turn", "id": int, "file": str}``: a session's next turn; its variables (and a new
               context, if any) are pickled in ``file`` in the workdir
=============  ==================================================================================

**Worker -> engine** (checked by the engine):

=============  ==================================================================================
``ready``      ``{"op": "ready", "version": 1, "pid": int, "layers": [str, ...]}``: sent once, after the
               worker confined itself and loaded ``context``
``call``       ``{"op": "call", "id": int, "method": "llm_batch" | "rlm_batch" | "budget", "args": [...]}``
               (``llm_batch``: prompts, model, max_tokens; ``rlm_batch``: queries, contexts, model;
               ``tool``: name, encoded args list, encoded kwargs dict; the reply's value is encoded too)
``answer``     ``{"op": "answer", "content": str, "ready": bool}``: model code changed ``answer`` (sent at
               once, so a draft outlives a cell that is killed or cancelled)
``done``       ``{"op": "done", "id": int, "output": str, "error": str | null, "notes": [str, ...],
               "variables": [str, ...], "answer": {"content": str, "ready": bool}}``: a cell finished
``var``        ``{"op": "var", "id": int, "text": str | null}``: the answer to ``get_var``
``turned``     ``{"op": "turned", "id": int}``: the turn's variables are in place
=============  ==================================================================================

**Values** that are not JSON types (a child agent's ``context`` may be bytes, a tuple or a dict with
non-str keys) travel tagged: ``{"\\u0000b": base64}`` for bytes, ``{"\\u0000t": [...]}`` for a tuple and
``{"\\u0000d": [[key, value], ...]}`` for a dict. Anything else is refused with ``TypeError`` in the cell.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

__all__ = [
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "check_worker_message",
    "decode_value",
    "encode_value",
    "encoded_size",
    "fit",
    "frame",
    "parse_frame",
]

PROTOCOL_VERSION = 1
#: The largest frame either side accepts (16 MiB). It bounds what one worker can make the engine buffer and
#: parse: JSON of many empty objects grows about 25x in memory once parsed, so a frame costs at most about
#: 400 MB for the moment it is parsed. A child agent's context over this size cannot be sent.
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: The largest frame the engine sends (1 GiB): the engine is trusted, and one reply holds a whole batch's
#: answers.
ENGINE_FRAME_BYTES = 1 << 30
#: The largest ``max_tokens`` a sub-call may ask for (no model's window is near it).
MAX_TOKENS_LIMIT = 1 << 24
HEADER = struct.Struct(">I")

_BYTES, _TUPLE, _DICT = "\x00b", "\x00t", "\x00d"
_METHODS = {"llm_batch": 3, "rlm_batch": 3, "budget": 0, "tool": 3}


class ProtocolError(Exception):
    """A frame or message that breaks the protocol (too long, not JSON, wrong shape)."""


def frame(message: dict[str, Any], limit: int = MAX_FRAME_BYTES) -> bytes:
    """One message as a frame: length header plus JSON. ``limit``: :data:`MAX_FRAME_BYTES` for what a worker
    sends, :data:`ENGINE_FRAME_BYTES` for what the engine sends.

    Raises:
        ProtocolError: the encoded message is longer than ``limit``.
    """
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(body) > limit:
        raise ProtocolError(f"message of {len(body):,} bytes is over the {limit:,}-byte frame limit")
    return HEADER.pack(len(body)) + body


def encoded_size(value: Any) -> int:
    """Bytes ``value`` takes inside a frame (as :func:`frame` encodes it)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))


def fit(text: str, budget: int) -> tuple[str, bool]:
    """``(text, True)`` when its JSON in a frame (quotes included) takes at most ``budget`` bytes, else ``(its
    longest prefix that does, False)``. A character takes 1 to 6 bytes of JSON (``\\u0001``), so a text of
    up to ``(budget - 2) // 6`` characters fits unmeasured; a longer one is measured in 64K-character pieces,
    once (a character's JSON does not depend on its neighbours): the OOLONG-Pairs answers of 6-8 M
    characters, mostly ASCII, fit a frame whole."""
    if len(text) <= (budget - 2) // 6:
        return text, True
    size, step = 2, 1 << 16
    for start in range(0, len(text), step):
        piece = text[start : start + step]
        grown = size + encoded_size(piece) - 2
        if grown > budget:
            lo, hi = 0, len(piece)  # the longest prefix of this piece that still fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if size + encoded_size(piece[:mid]) - 2 <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            return text[: start + lo], False
        size = grown
    return text, True


def frame_length(header: bytes, limit: int = MAX_FRAME_BYTES) -> int:
    """The body length a 4-byte header announces.

    Raises:
        ProtocolError: over ``limit`` (as for :func:`frame`).
    """
    (n,) = HEADER.unpack(header)
    if n > limit:
        raise ProtocolError(f"frame of {n:,} bytes announced; the limit is {limit:,}")
    return int(n)


def parse_frame(body: bytes) -> dict[str, Any]:
    """A frame's body as a message dict.

    Raises:
        ProtocolError: not UTF-8 JSON, or not an object with a str ``op``.
    """
    try:
        message = json.loads(body.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not UTF-8 JSON of sane depth: {type(exc).__name__}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError("a message must be a JSON object with a str 'op'")
    return message


def encode_value(value: Any, _depth: int = 0) -> Any:
    """``value`` as JSON data, tagging bytes, tuples and dicts (see the module docstring).

    Raises:
        TypeError: a type other than None, bool, int, float, str, bytes, list, tuple and dict, or nesting
            deeper than 100 levels.
    """
    if _depth > 100:
        raise TypeError("a context nested more than 100 levels deep cannot be sent")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, list):
        return [encode_value(v, _depth + 1) for v in value]
    if isinstance(value, tuple):
        return {_TUPLE: [encode_value(v, _depth + 1) for v in value]}
    if isinstance(value, dict):
        return {_DICT: [[encode_value(k, _depth + 1), encode_value(v, _depth + 1)] for k, v in value.items()]}
    raise TypeError(
        f"a {type(value).__name__} cannot be passed to a child agent: use str, bytes, numbers, lists, tuples "
        "or dicts of those"
    )


def decode_value(data: Any, _depth: int = 0) -> Any:
    """The inverse of :func:`encode_value`.

    Raises:
        ProtocolError: malformed tags, unhashable dict keys, or nesting deeper than 100 levels.
    """
    if _depth > 100:
        raise ProtocolError("value nested too deeply")
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode_value(v, _depth + 1) for v in data]
    if isinstance(data, dict) and len(data) == 1:
        ((tag, inner),) = data.items()
        if tag == _BYTES and isinstance(inner, str):
            try:
                return base64.b64decode(inner, validate=True)
            except ValueError:
                raise ProtocolError("bad base64 in a bytes value") from None
        if tag == _TUPLE and isinstance(inner, list):
            return tuple(decode_value(v, _depth + 1) for v in inner)
        if tag == _DICT and isinstance(inner, list):
            out: dict[Any, Any] = {}
            for pair in inner:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise ProtocolError("a dict value must be a list of [key, value] pairs")
                key = decode_value(pair[0], _depth + 1)
                try:
                    out[key] = decode_value(pair[1], _depth + 1)
                except TypeError:
                    raise ProtocolError("unhashable dict key") from None
            return out
    raise ProtocolError(f"not an encoded value: {type(data).__name__}")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_worker_message(message: dict[str, Any]) -> dict[str, Any]:
    """Check one message from a worker against the protocol; return it unchanged.

    Raises:
        ProtocolError: an unknown ``op`` or method, or a field of the wrong type.
    """
    op = message["op"]
    ok = False
    if op == "ready":
        ok = message.get("version") == PROTOCOL_VERSION and _is_id(message.get("pid"))
        ok = ok and _is_str_list(message.get("layers"))
    elif op == "call":
        method, args = message.get("method"), message.get("args")
        ok = (
            _is_id(message.get("id"))
            and method in _METHODS
            and isinstance(args, list)
            and len(args) == _METHODS[str(method)]
            and _call_args_ok(str(method), args)
        )
    elif op == "done":
        answer = message.get("answer")
        ok = _is_id(message.get("id")) and isinstance(message.get("output"), str)
        ok = ok and (message.get("error") is None or isinstance(message.get("error"), str))
        ok = ok and _is_str_list(message.get("notes")) and _is_str_list(message.get("variables", []))
        ok = ok and isinstance(answer, dict) and isinstance(answer.get("content"), str)
        ok = ok and isinstance(answer, dict) and isinstance(answer.get("ready"), bool)
    elif op == "answer":
        ok = isinstance(message.get("content"), str) and isinstance(message.get("ready"), bool)
    elif op == "turned":
        ok = _is_id(message.get("id"))
    elif op == "var":
        ok = _is_id(message.get("id")) and (message.get("text") is None or isinstance(message.get("text"), str))
    if not ok:
        raise ProtocolError(f"malformed {op!r} message from the worker")
    return message


def _call_args_ok(method: str, args: list[Any]) -> bool:
    if method == "llm_batch":
        prompts, model, max_tokens = args
        return (
            _is_str_list(prompts)
            and (model is None or isinstance(model, str))
            and (max_tokens is None or (_is_id(max_tokens) and 1 <= max_tokens <= MAX_TOKENS_LIMIT))
        )
    if method == "rlm_batch":
        queries, contexts, model = args
        return (
            _is_str_list(queries)
            and isinstance(contexts, list)
            and len(contexts) == len(queries)
            and (model is None or isinstance(model, str))
        )
    if method == "tool":
        name, tool_args, tool_kwargs = args
        return isinstance(name, str) and isinstance(tool_args, list) and isinstance(tool_kwargs, dict)
    return True
