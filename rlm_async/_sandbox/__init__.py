"""Confinement of REPL worker processes: the layers, how to probe them, and ``rlm-async doctor``'s report.

``_layers`` runs in the engine (what is supported, which layers a level uses, the worker's command line);
``_confine`` runs inside the worker (rlimits, Landlock, seccomp), loaded by path.
"""

from ._layers import LayerSupport, Sandbox, WorkerPlan, describe, plan_for, probe

__all__ = ["LayerSupport", "Sandbox", "WorkerPlan", "describe", "plan_for", "probe"]
