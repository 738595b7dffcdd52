"""A simulated OpenAI-compatible LLM server for tests, benchmarks and keyless demos.

It simulates **latency, load and faults, not intelligence**: a latency model (TTFT + prefill + decode, jitter,
outliers, server capacity), rate limits and fault injection, with content from a scripted RLM root and a
rule-based sub-model that answer only the task families they recognise.
"""

from ._faults import FAULT_KINDS, FaultPlan
from ._latency import PROFILES, LatencyModel
from ._process import RemoteSim, sim_process
from ._responders import VERSE_COUNT_PROMPT, Responder, RuleBasedSubModel, ScriptedRoot, SimResponder, verse_counts
from ._server import SimConfig, SimServer, SimStats

__all__ = [
    "FAULT_KINDS",
    "PROFILES",
    "VERSE_COUNT_PROMPT",
    "FaultPlan",
    "LatencyModel",
    "RemoteSim",
    "Responder",
    "RuleBasedSubModel",
    "ScriptedRoot",
    "SimConfig",
    "SimResponder",
    "SimServer",
    "SimStats",
    "sim_process",
    "verse_counts",
]
