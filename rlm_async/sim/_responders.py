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
    ``Count the lines that mention "W"``, ``Reply with the word W``, and the eval tasks' prompts
    (``rlm_async.eval._simulated.sub_answer``).
    """

    _VERSES = re.compile(r'Count the verses that contain the word "([^"]+)"')
    _KEY = re.compile(r'Find the line holding the key "([^"]+)"')
    _MENTIONS = re.compile(r'Count the lines that mention "([^"]+)"')
    _REPLY = re.compile(r"^Reply with the word (\w+)")

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
        if m := self._REPLY.match(prompt):
            return m.group(1)
        from ..eval._simulated import sub_answer  # lazy: rlm_async.eval imports the simulator

        if (reply := sub_answer(prompt)) is not None:
            return reply
        words = prompt.split()
        return f"Noted {len(words)} words, starting: {' '.join(words[:8])}"


_QUERY = re.compile(r"^(?:Query|Answer the following): (.*)$", re.MULTILINE)
_FANOUT = re.compile(r"Fan out (\d+) sub-calls")
_RECURSIVE = re.compile(r"Recursive fan-out k=(\d+) depth=(\d+)")
_LOOP_CALLS = re.compile(r"Loop (\d+) sub-calls")
_LOOP_AGENTS = re.compile(r"Loop (\d+) child agents")
_WORD = re.compile(r"""the word ['"]?([A-Za-z]+)['"]?""")

#: The key-lookup prompt for index ``i``, as Python source for generated model code; RuleBasedSubModel answers
#: it with ``key k{i} found``, the line that holds the key.
KEY_PROMPT_EXPR = """f'Find the line holding the key "k{i}"\\n\\nfiller\\nkey k{i} found'"""


#: Model code that tells an answer from a failed sub-call in either dialect (rlm_async returns SubcallFailure
#: objects; the official rlms returns error strings).
_OK = """
def _ok(r):
    return isinstance(r, str) and not r.startswith("Error")
"""


def _block(*parts: str) -> str:
    """A ```repl block from code parts, each dedented on its own (so parts can be composed)."""
    code = "\n".join(textwrap.dedent(part).strip() for part in parts)
    return f"```repl\n{code}\n```"


def _loop(n: int, call: str, hit: str, label: str) -> str:
    """A block making ``call`` n times, one at a time (``i`` is the index), counting results where ``hit``
    holds; answers ``"<hits> of <n> <label>"``."""
    return _block(
        f"""
        hits = 0
        for i in range({n}):
            r = {call}
            hits += {hit}
        answer["content"] = f"{{hits}} of {n} {label}"
        answer["ready"] = True
        """
    )


class ScriptedRoot:
    """Plays an RLM root (or child agent) turn by turn, with a fixed program per task family.

    It writes rlm_async's dialect (``await llm_batch``) when the system prompt teaches it, and the official
    ``rlms`` dialect (plain ``llm_query_batched`` / ``rlm_query_batched``) otherwise, so one workload runs on
    both engines. Families, recognised from the query (``Query: ...`` or the official ``Answer the
    following: ...``):

    - verse counts ("In how many verses of each book does the word 'W' occur?"): peek; split the verse lines
      into chunks of about ``chunk_chars`` characters; one batch over all chunks with
      :data:`VERSE_COUNT_PROMPT`; retry failed chunks once; sum the JSON counts; answer JSON.
    - "Fan out N sub-calls": one batch of N key-lookup prompts; answer how many came back right.
    - "Recursive fan-out k=K depth=D": K child agents at once, each the head of a chain of D agents (context
      ``"Chain d"``) whose last agent makes one plain call; answer how many chains returned ``LEAF``.
    - "Loop N sub-calls": the fan-out above written as a loop of single ``llm_query`` calls (one at a time).
    - "Loop K child agents": K child agents (``"Chain 1"``) started one at a time (``rlm_agent`` /
      ``rlm_query``); answer how many returned ``LEAF``.
    - an agent with no query whose ``context`` reads ``"Chain d"`` (an official child) or a query
      ``"Chain d"``: the chain step above.
    - the eval tasks' questions (S-NIAH, OOLONG, OOLONG-Pairs): ``rlm_async.eval._simulated.root_program``.
    - anything else: peek; chunk; one batch asking for notes; answer with the number of notes.
    """

    def __init__(self, chunk_chars: int = 30_000) -> None:
        self.chunk_chars = chunk_chars

    def respond(self, messages: Sequence[dict[str, str]]) -> str:
        if "no turns left" in messages[-1]["content"]:
            return "I ran out of turns before finishing."
        turn = sum(m["role"] == "assistant" for m in messages)
        asynchronous = "await llm_batch" in (messages[0]["content"] if messages else "")
        first = next(
            (m["content"] for m in messages if "Query: " in m["content"] or "Answer the following" in m["content"]), ""
        )
        q = _QUERY.search(first)
        query = q.group(1).strip() if q else ""
        program = self._program(query, asynchronous)
        return program[min(turn, len(program) - 1)]

    def _program(self, query: str, asynchronous: bool) -> list[str]:
        word = _WORD.search(query)
        if word and "verses" in query:
            return self._verse_counts(word.group(1), asynchronous)
        if m := _FANOUT.search(query):
            return [self._fanout(int(m.group(1)), asynchronous)]
        if m := _RECURSIVE.search(query):
            return [self._recursive(int(m.group(1)), int(m.group(2)), asynchronous)]
        if m := _LOOP_CALLS.search(query):
            return [self._loop_calls(int(m.group(1)), asynchronous)]
        if m := _LOOP_AGENTS.search(query):
            return [self._loop_agents(int(m.group(1)), asynchronous)]
        if not query or query.startswith("Chain "):
            return [self._chain_step(asynchronous)]
        from ..eval._simulated import root_program  # lazy: rlm_async.eval imports the simulator

        return root_program(query, asynchronous) or self._generic(asynchronous)

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

    def _verse_counts(self, word: str, asynchronous: bool) -> list[str]:
        batch = "await llm_batch" if asynchronous else "llm_query_batched"
        peek = _block(
            """
            lines = context.splitlines() if isinstance(context, str) else list(context)
            print(len(lines), "lines;", sum(len(x) for x in lines), "characters")
            print(lines[:2])
            """
        )
        work = _block(
            "import json",
            _OK,
            self._chunking(),
            f"""
            template = {VERSE_COUNT_PROMPT.format(word=word)!r}
            prompts = [template + chunk for chunk in chunks]
            results = {batch}(prompts)
            failed = [i for i, r in enumerate(results) if not _ok(r)]
            if failed:
                again = {batch}([prompts[i] for i in failed])
                for i, r in zip(failed, again):
                    results[i] = r
            counts = {{}}
            for r in results:
                if _ok(r):
                    for book, n in json.loads(r).items():
                        counts[book] = counts.get(book, 0) + n
            answer["content"] = json.dumps(counts)
            still_failed = sum(not _ok(r) for r in results)
            print(len(chunks), "chunks;", still_failed, "failed;", sum(counts.values()), "verses")
            """,
        )
        finish = _block(
            """
            if still_failed:
                print(still_failed, "chunks failed twice; answering with the counts of the rest")
            answer["ready"] = True
            """
        )
        return [peek, work, finish]

    def _fanout(self, n: int, asynchronous: bool) -> str:
        batch = "await llm_batch" if asynchronous else "llm_query_batched"
        return _block(
            f"""
            prompts = [{KEY_PROMPT_EXPR} for i in range({n})]
            results = {batch}(prompts)
            right = sum(1 for i, r in enumerate(results) if r == f"key k{{i}} found")
            answer["content"] = f"{{right}} of {n} right"
            answer["ready"] = True
            """
        )

    def _recursive(self, k: int, depth: int, asynchronous: bool) -> str:
        heads = f'[f"Chain {depth}"] * {k}'
        call = f"await rlm_batch({heads}, {heads})" if asynchronous else f"rlm_query_batched({heads})"
        return _block(
            f"""
            results = {call}
            done = sum(1 for r in results if isinstance(r, str) and r.strip() == "LEAF")
            answer["content"] = f"{{done}} of {k} chains answered"
            answer["ready"] = True
            """
        )

    def _loop_calls(self, n: int, asynchronous: bool) -> str:
        call = "await llm_query" if asynchronous else "llm_query"
        return _loop(n, f"{call}({KEY_PROMPT_EXPR})", 'r == f"key k{i} found"', "right")

    def _loop_agents(self, k: int, asynchronous: bool) -> str:
        call = 'await rlm_agent("Chain 1", "Chain 1")' if asynchronous else 'rlm_query("Chain 1")'
        return _loop(k, call, 'isinstance(r, str) and r.strip() == "LEAF"', "chains answered")

    def _chain_step(self, asynchronous: bool) -> str:
        child = 'await rlm_agent(f"Chain {d}", f"Chain {d}")' if asynchronous else 'rlm_query(f"Chain {d}")'
        leaf = (
            'await llm_query("Reply with the word LEAF")' if asynchronous else 'llm_query("Reply with the word LEAF")'
        )
        return _block(
            f"""
            import re
            m = re.match(r"Chain (\\d+)", str(context))
            d = int(m.group(1)) - 1 if m else 0
            r = {child} if d >= 1 else {leaf}
            answer["content"] = str(r).strip()
            answer["ready"] = True
            """
        )

    def _generic(self, asynchronous: bool) -> list[str]:
        batch = "await llm_batch" if asynchronous else "llm_query_batched"
        peek = _block(
            """
            text = context if isinstance(context, str) else "\\n".join(map(str, context))
            lines = text.splitlines()
            print(len(text), "characters;", len(lines), "lines")
            print(text[:300])
            """
        )
        work = _block(
            _OK,
            self._chunking(),
            """
            notes = BATCH(["Take notes on this text:\\n\\n" + c for c in chunks])
            ok = [n for n in notes if _ok(n)]
            FINAL(f"{len(ok)} of {len(chunks)} chunks noted")
            """.replace("BATCH", batch),
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
