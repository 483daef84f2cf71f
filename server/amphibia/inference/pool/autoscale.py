"""When to add or remove a pool worker, from the broker's own signals: how long requests wait for a
slot, and how long the pool has had nothing to do.

Pure policy (no Ray, no clock of its own): `ray_workers.py` feeds it what it sees and carries out
what it decides, so the rules can be read and tested in one place.
- Up: the p90 of queue waits over the last `window_s` since the last change of size (requests that
  got a slot, and the age of those still waiting) exceeds `scale_up_wait_s`, below `max_workers`, and no scale-up happened in
  the last `cooldown_s` (a new worker takes that long to load its model and join; adding another
  meanwhile would overshoot).
- Down: nothing ran and nothing waited for `idle_s`, above `min_workers`. One at a time.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ...config import RayConfig


@dataclass(frozen=True)
class Decision:
    at: float  # time.time() of the decision
    direction: str  # "up" or "down"
    reason: str
    workers: int  # workers before the decision

    def as_json(self) -> dict:
        return {"at": round(self.at, 3), "direction": self.direction, "reason": self.reason, "workers": self.workers}


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] if ordered else 0.0


@dataclass
class Autoscaler:
    config: RayConfig
    waits: deque[tuple[float, float]] = field(default_factory=deque)  # (monotonic time, seconds waited)
    last_busy: float = 0.0
    last_up: float = float("-inf")
    # Waits from before the last change of size describe the pool as it was: they do not count after it
    # (else a scale-down right after a burst would be undone by the burst's own waits).
    last_change: float = float("-inf")

    def observe_wait(self, now: float, waited_s: float) -> None:
        """A request got its slot after `waited_s`."""
        self.waits.append((now, waited_s))

    def decide(self, now: float, wall: float, workers: int, waiting_ages: list[float], busy: bool) -> Decision | None:
        """`workers`: placed and not failed (starting ones included, so a slow start is not doubled);
        `waiting_ages`: how long each request still waiting has waited; `busy`: anything running."""
        cfg = self.config
        while self.waits and self.waits[0][0] < max(now - cfg.window_s, self.last_change):
            self.waits.popleft()
        if busy or waiting_ages:
            self.last_busy = now
        if workers < cfg.min_workers:
            return Decision(wall, "up", f"{workers} of min_workers {cfg.min_workers} placed", workers)
        if workers > cfg.max_workers:
            return Decision(wall, "down", f"{workers} workers, above max_workers {cfg.max_workers}", workers)
        samples = [w for _, w in self.waits] + list(waiting_ages)
        wait = p90(samples)
        if (samples and wait > cfg.scale_up_wait_s and workers < cfg.max_workers
                and now - self.last_up >= cfg.cooldown_s):
            self.last_up = self.last_change = now
            return Decision(wall, "up", f"queue wait p90 {wait:.2f} s over {len(samples)} requests in the last "
                                        f"{cfg.window_s:g} s > scale_up_wait_s {cfg.scale_up_wait_s:g} s", workers)
        if workers > cfg.min_workers and now - self.last_busy >= cfg.idle_s:
            self.last_busy = self.last_change = now  # one at a time: the next one after another idle period
            return Decision(wall, "down", f"idle for {cfg.idle_s:g} s", workers)
        return None
