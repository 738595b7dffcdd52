"""Batch jobs: many documents, each an RLM run, through one engine or across a Ray cluster (docs/scale-out.md).

``await rlm_async.batch(items, model, out="results.jsonl", ...)`` runs them on this machine (or on Ray with
``ray=``) and returns a :class:`BatchReport`; :func:`ray_batch` is the Ray variant as an async iterator of
:class:`ItemResult`. ``rlm-async batch INPUT.jsonl --out RESULTS.jsonl`` is the command. Ray is imported only
on the Ray path (``pip install 'rlm-async[ray]'``).
"""

from ._api import DEFAULT_ITEM_ATTEMPTS, DEFAULT_MAX_RUNS, BatchReport, batch, ray_batch
from ._items import BatchItem, ItemResult, ItemStatus, coerce_items, read_items
from ._lease import LeaseSizes
from ._store import ResultStore

__all__ = [
    "DEFAULT_ITEM_ATTEMPTS",
    "DEFAULT_MAX_RUNS",
    "BatchItem",
    "BatchReport",
    "ItemResult",
    "ItemStatus",
    "LeaseSizes",
    "ResultStore",
    "batch",
    "coerce_items",
    "ray_batch",
    "read_items",
]
