"""Content for the simulator: a scripted RLM root and a rule-based sub-model.

They simulate *behaviour*, not intelligence: the root plays fixed programs (peek -> chunk -> ``await
llm_batch`` -> aggregate -> answer) for the task families it recognises, and the sub-model answers only the
sub-tasks it recognises in a prompt, by plain computation on the text it was given. That is enough to grade a
run end to end, and to load the engine the way a real RLM run does.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

__all__ = ["VERSE_COUNT_PROMPT", "Responder", "RuleBasedSubModel", "ScriptedRoot", "SimResponder", "verse_counts"]


class Responder(Protocol):
    """Produces the assistant text for one chat request."""

    def respond(self, messages: Sequence[dict[str, str]]) -> str: ...


#: The sub-task of the verse-count family. ``{word}`` is filled in; the chunk of verse lines follows it.
VERSE_COUNT_PROMPT = (
    'Count the verses that contain the word "{word}" (whole word, any case), for each book.\n'
    'Each line below is one verse: "<Book> <chapter>:<verse> <text>".\n'
    'Answer with JSON only, e.g. {{"Genesis": 3}}; leave out books with no such verse.\n\n'
)
_VERSE_LINE = re.compile(r"^(.+?) (\d+):(\d+) (.*)$")


def verse_counts(lines: Sequence[str], word: str) -> dict[str, int]:
    """Per book, the verses whose text contains ``word`` as a whole word, any case (the ground-truth rule)."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    counts: Counter[str] = Counter()
    for line in lines:
        m = _VERSE_LINE.match(line)
        if m and pattern.search(m.group(4)):
            counts[m.group(1)] += 1
    return dict(counts)


class RuleBasedSubModel:
    """Answers the sub-tasks it recognises; anything else gets a short, deterministic generic reply.

    Recognised: the verse-count prompt (:data:`VERSE_COUNT_PROMPT`), ``Find the line holding the key "K"``,
    ``Count the lines that mention "W"``.
    """

    _VERSES = re.compile(r'Count the verses that contain the word "([^"]+)"')
    _KEY = re.compile(r'Find the line holding the key "([^"]+)"')
    _MENTIONS = re.compile(r'Count the lines that mention "([^"]+)"')

    def respond(self, messages: Sequence[dict[str, str]]) -> str:
        prompt = messages[-1]["content"]
        head, _, body = prompt.partition("\n\n")
        if m := self._VERSES.search(head):
            return json.dumps(verse_counts(body.splitlines(), m.group(1)), sort_keys=True)
        if m := self._KEY.search(head):
            return next((line for line in body.splitlines() if m.group(1) in line), "NOT FOUND")
        if m := self._MENTIONS.search(head):
            word = m.group(1).lower()
            return str(sum(word in line.lower() for line in body.splitlines()))
        words = prompt.split()
        return f"Noted {len(words)} words, starting: {' '.join(words[:8])}"


_QUERY = re.compile(r"^Query: (.*)$", re.MULTILINE)
_WORD = re.compile(r"""the word ['"]?([A-Za-z]+)['"]?""")


def _block(*parts: str) -> str:
    """A ```repl block from code parts, each dedented on its own (so parts can be composed)."""
    code = "\n".join(textwrap.dedent(part).strip() for part in parts)
    return f"```repl\n{code}\n```"


class ScriptedRoot:
    """Plays an RLM root (or child agent) turn by turn, with a fixed program per task family.

    Families, recognised from the query:

    - verse counts ("In how many verses of each book does the word 'W' occur?"): peek; split the verse lines
      into chunks of about ``chunk_chars`` characters; one ``llm_batch`` over all chunks with
      :data:`VERSE_COUNT_PROMPT`; retry failed chunks once; sum the JSON counts; answer JSON.
    - anything else: peek; chunk; one ``llm_batch`` asking for notes; answer with the number of notes.
    """

    def __init__(self, chunk_chars: int = 30_000) -> None:
        self.chunk_chars = chunk_chars

    def respond(self, messages: Sequence[dict[str, str]]) -> str:
        turn = sum(m["role"] == "assistant" for m in messages)
        first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
        q = _QUERY.search(first_user)
        query = q.group(1) if q else ""
        if "no turns left" in messages[-1]["content"]:
            return "I ran out of turns before finishing."
        word = _WORD.search(query)
        program = self._verse_counts(word.group(1)) if word and "verses" in query else self._generic()
        return program[min(turn, len(program) - 1)]

    def _chunking(self) -> str:
        return f"""
        chunks, current, size = [], [], 0
        for line in lines:
            current.append(line)
            size += len(line) + 1
            if size >= {self.chunk_chars}:
                chunks.append("\\n".join(current))
                current, size = [], 0
        if current:
            chunks.append("\\n".join(current))
        """

    def _verse_counts(self, word: str) -> list[str]:
        peek = _block(
            """
            lines = context.splitlines() if isinstance(context, str) else list(context)
            print(len(lines), "lines;", sum(len(x) for x in lines), "characters")
            print(lines[:2])
            """
        )
        work = _block(
            "import json",
            self._chunking(),
            f"""
            template = {VERSE_COUNT_PROMPT.format(word=word)!r}
            prompts = [template + chunk for chunk in chunks]
            results = await llm_batch(prompts)
            failed = [i for i, r in enumerate(results) if is_failure(r)]
            if failed:
                again = await llm_batch([prompts[i] for i in failed])
                for i, r in zip(failed, again):
                    results[i] = r
            counts = {{}}
            for r in results:
                if not is_failure(r):
                    for book, n in json.loads(r).items():
                        counts[book] = counts.get(book, 0) + n
            answer["content"] = json.dumps(counts)
            still_failed = sum(is_failure(r) for r in results)
            print(len(chunks), "chunks;", still_failed, "failed;", sum(counts.values()), "verses")
            """,
        )
        finish = _block(
            """
            if still_failed == 0:
                answer["ready"] = True
            else:
                print("some chunks failed; keeping the draft")
                answer["ready"] = True
            """
        )
        return [peek, work, finish]

    def _generic(self) -> list[str]:
        peek = _block(
            """
            text = context if isinstance(context, str) else "\\n".join(map(str, context))
            lines = text.splitlines()
            print(len(text), "characters;", len(lines), "lines")
            print(text[:300])
            """
        )
        work = _block(
            self._chunking(),
            """
            notes = await llm_batch(["Take notes on this text:\\n\\n" + c for c in chunks])
            ok = [n for n in notes if not is_failure(n)]
            FINAL(f"{len(ok)} of {len(chunks)} chunks noted")
            """,
        )
        return [peek, work]


class SimResponder:
    """Routes a request: to the scripted root when its system prompt is an RLM's, else to the sub-model."""

    def __init__(self, root: Responder | None = None, sub: Responder | None = None) -> None:
        self.root = root or ScriptedRoot()
        self.sub = sub or RuleBasedSubModel()

    def respond(self, messages: Sequence[dict[str, str]]) -> str:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        if "Recursive Language Model" in system:
            return self.root.respond(messages)
        return self.sub.respond(messages)
