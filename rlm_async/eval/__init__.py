"""Quality evals: S-NIAH, OOLONG and OOLONG-Pairs, generated locally from a seed, with the papers' scorers.

``generate(task, n, length_tokens, seed)`` makes :class:`Item` s; ``run_eval(items, engine=...)`` runs them
through ``rlm_async``, the official ``rlms`` or one plain call, into a resumable ``results.jsonl`` with a
summary and a plot; ``rlm-async eval`` is the command line (``rlm_async.eval._cli``). docs/eval.md says how
each generator follows RULER and OOLONG and where it departs. Without a model the runs go to the embedded
simulator, whose scores measure the plumbing, not intelligence.
"""

from ._engines import ENGINES, EngineName, ModelConfig, Outcome
from ._niah import VARIANTS, NiahSpec, niah_item
from ._oolong import parse_question, question_text
from ._pairs import PAIR_QUERIES
from ._runner import EvalSummary, read_results, run_eval
from ._scorers import oolong_parse, oolong_score, pair_f1, pairs_score, parse_pairs, string_match_all
from ._stats import GroupSummary, bootstrap_ci, percentile, summarise
from ._task import Expected, Family, Item, OolongExpected, PairsExpected, Scorer, Task
from ._tasks import TASKS, generate, parse_length, parse_lengths
from ._trec import data_dir, load_pool

__all__ = [
    "ENGINES",
    "PAIR_QUERIES",
    "TASKS",
    "VARIANTS",
    "EngineName",
    "EvalSummary",
    "Expected",
    "Family",
    "GroupSummary",
    "Item",
    "ModelConfig",
    "NiahSpec",
    "OolongExpected",
    "Outcome",
    "PairsExpected",
    "Scorer",
    "Task",
    "bootstrap_ci",
    "data_dir",
    "generate",
    "load_pool",
    "niah_item",
    "oolong_parse",
    "oolong_score",
    "pair_f1",
    "pairs_score",
    "parse_length",
    "parse_lengths",
    "parse_pairs",
    "parse_question",
    "percentile",
    "question_text",
    "read_results",
    "run_eval",
    "string_match_all",
    "summarise",
]
