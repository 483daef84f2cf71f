"""`amphibia bench broker` in miniature: the real broker and wire codec against simulated workers, a
few seconds, in-process. No timing is asserted: only that the run measures what it says and that
every request ends with all its tokens, fairly shared."""
from __future__ import annotations

import asyncio

import pytest

from amphibia.bench.broker import Shape, Simulation, jain

SMALL = Shape(apps=24, backlogged=4, workers=4, slots=4, step_ms=10.0, warmup_s=0.5, measure_s=1.5, drain_s=30.0,
              drain_step_ms=1.0, short_tokens=(4, 16), long_tokens=(24, 64), prompt_tokens=(4, 16))
KEYS = ("routed_tok_s", "cpu_us_per_token", "gateway_cpu_us_per_token", "broker_cpu_us_per_token", "reassign_p99_ms",
        "jain", "rss_mb", "offered_tok_s", "occupancy", "preemptions_s")


@pytest.mark.parametrize("coalesce", [True, False], ids=["tokens-frames", "token-frames"])
def test_simulated_pool_routes_every_token_fairly(coalesce: bool) -> None:
    sim = Simulation(Shape(**{**SMALL.__dict__, "coalesce": coalesce}))
    result = asyncio.run(sim.run())
    for key in KEYS:
        assert result[key] is not None, key
    assert result["routed_tok_s"] > 0 and result["occupancy"] > 0.5
    # Every request finished with exactly its max_tokens, each piece read once, none failed.
    assert result["submitted"] == result["finished"] == result["complete"] == len(sim.clients) > 50, result
    assert all(c.error is None and c.pieces == c.max_tokens for c in sim.clients)
    # Nothing is left in the broker, nor in the indexes it keeps beside its state.
    broker = sim.broker
    assert not broker.jobs and not broker.queued() and not any(broker.queues.values())
    assert not broker._waiting and not broker._running and not broker._jobs_of
    assert not any(w.running for w in broker.workers.values()) and len(broker._free) == SMALL.workers
    assert result["backlogged_apps"] >= 2 and result["jain"] > 0.9, result


def test_jain() -> None:
    assert jain([3.0, 3.0, 3.0]) == 1.0
    assert jain([1.0, 0.0, 0.0, 0.0]) == 0.25
