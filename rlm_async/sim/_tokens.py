"""Token counts for the simulator's ``usage``: exact o200k counts when quicktok is installed.

With the ``sim`` extra (``quicktok-v1``, an offline BPE tokenizer bundling OpenAI's o200k_base), counts are
exact for o200k models; without it they fall back to the engine's documented estimate, ceil(chars / 4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from .._budget import estimate_tokens

__all__ = ["token_counter"]


@functools.cache
def token_counter() -> tuple[str, Callable[[str], int]]:
    """``(name, count)``: the tokenizer in use and a function from text to its token count."""
    try:
        import quicktok
    except ImportError:
        return "estimate(chars/4)", lambda text: estimate_tokens(len(text))
    encoding = quicktok.get_encoding("o200k_base")
    return "o200k_base", lambda text: len(encoding.encode(text))
