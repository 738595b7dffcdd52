from __future__ import annotations

import pytest

from rlm_async import BudgetExceeded, ConfigError, Limits, Price
from rlm_async._budget import Ledger


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_concurrency": 0},
        {"max_depth": 0},
        {"max_calls": -1},
        {"max_fanout": 0},
        {"max_iterations": 0},
        {"timeout_s": 0},
        {"max_cost_usd": -0.5},
        {"max_concurrency": None},
        {"max_calls": "10"},
        {"max_agents": True},
        {"max_calls": 0},
        {"max_concurrency": 1.5},
        {"max_iterations": 2.7},
        {"max_output_tokens": 0},
        {"max_workers": 0},
        {"cell_timeout_s": -1},
    ],
)
def test_bad_limits_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        Limits(**kwargs)


def test_calls_are_reserved_all_or_nothing_and_refunded():
    ledger = Ledger(Limits(max_calls=10))
    ledger.reserve_calls(7)
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve_calls(4)
    assert info.value.limit == "max_calls" and info.value.cap == 10
    assert ledger.calls_reserved == 7  # nothing taken by the refused batch
    ledger.refund_calls(2)
    ledger.reserve_calls(5)
    assert ledger.remaining()["calls"] == 0


def test_fanout_and_agents():
    ledger = Ledger(Limits(max_fanout=3, max_agents=2))
    ledger.check_fanout(3)
    with pytest.raises(BudgetExceeded, match="max_fanout"):
        ledger.check_fanout(4)
    ledger.reserve_agents(2)
    with pytest.raises(BudgetExceeded, match="max_agents"):
        ledger.reserve_agents(1)


@pytest.mark.parametrize(
    ("limits", "limit"),
    [
        (Limits(max_input_tokens=100), "max_input_tokens"),
        (Limits(max_output_tokens=20), "max_output_tokens"),
        (Limits(max_cost_usd=0.0001), "max_cost_usd"),
    ],
)
def test_spend_caps_refuse_once_spent(limits, limit):
    ledger = Ledger(limits, {"m": Price(1.0, 2.0)})
    ledger.check_spend()
    ledger.settle(depth=0, agent_id="0", model="m", prompt_tokens=100, completion_tokens=50, cost_usd=None)
    with pytest.raises(BudgetExceeded) as info:
        ledger.check_spend()
    assert info.value.limit == limit


def test_usage_breakdowns_add_up():
    ledger = Ledger(Limits(), {"a": Price(1.0, 1.0)})
    ledger.settle(depth=0, agent_id="0", model="a", prompt_tokens=10, completion_tokens=1, cost_usd=None)
    ledger.settle(depth=1, agent_id="0", model="b", prompt_tokens=5, completion_tokens=2, cost_usd=0.5)
    ledger.settle(depth=1, agent_id="0.1", model="a", prompt_tokens=3, completion_tokens=3, cost_usd=None)
    usage = ledger.usage()
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (3, 18, 6)
    assert usage.cost_usd == pytest.approx(0.5 + 11e-6 + 6e-6)
    for view in (usage.by_depth, usage.by_agent, usage.by_model):
        assert sum(t.calls for t in view.values()) == 3
        assert sum(t.prompt_tokens for t in view.values()) == 18
    assert usage.by_depth[1].calls == 2 and usage.by_agent["0.1"].prompt_tokens == 3


def test_cost_cap_needs_a_price():
    ledger = Ledger(Limits(max_cost_usd=1.0), {"priced": Price(1, 1)})
    ledger.check_priced("priced")
    with pytest.raises(ConfigError, match="no price"):
        ledger.check_priced("unpriced")


def test_the_small_model_profile_and_its_overrides():
    from rlm_async import cli

    small = Limits.small_model()
    assert (small.max_tokens_per_turn, small.max_iterations, small.max_output_chars) == (512, 8, 2000)
    assert small.max_tokens_per_subcall == 1024
    assert Limits.small_model(max_iterations=3, max_concurrency=2).max_iterations == 3
    assert cli.LOCAL_LIMITS == {
        "max_tokens_per_turn": 512,
        "max_tokens_per_subcall": 1024,
        "max_iterations": 8,
        "max_output_chars": 2000,
    }
    assert cli._parser().parse_args(["run", "q", "--context", "-", "--profile", "small"]).profile == "small"
    with pytest.raises(ConfigError):
        Limits.small_model(max_iterations=0)
