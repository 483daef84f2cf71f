"""Pictures of the pool from its `GET /pool` data: who held which slot when, queues, service.

The gateway keeps a timeline of slot events (start, end, preempt, cancel, lost) per job; paired
up, they become bars on one row per slot of each worker, coloured by app. Queue depth and each
app's service (its VTC counter) are not in the timeline, so they are sampled at every poll:
`pool_view(..., until=...)` polls and redraws during a run.
"""
from __future__ import annotations

import io
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

ENDS = ("end", "preempt", "cancel", "lost")


def base_url(gateway: Any) -> str:
    """A BackgroundGateway, or a gateway's address (http://, ws://, with or without a path)."""
    if hasattr(gateway, "url"):
        return gateway.url
    from .remote import split_url

    return split_url(str(gateway))[0]


@dataclass
class Sample:
    t: float
    queues: dict[str, int]
    service: dict[str, float]
    running: dict[str, int]  # worker -> sequences running


@dataclass
class Slot:
    """One job's stay on one slot of one worker."""

    worker: str
    lane: int
    app: str
    job: str
    start: float
    end: float
    how: str  # how it left: end, preempt, cancel, lost, or running (still there)
    generated: int = 0


@dataclass
class PoolTrace:
    """What was seen of a gateway's pool since `since` (unix time): events plus sampled state."""

    url: str
    since: float = 0.0
    events: list[dict] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)  # id -> slots (every worker ever seen)

    def poll(self) -> dict:
        last = max((e["t"] for e in self.events), default=self.since)
        data = httpx.get(f"{self.url}/pool", params={"since": repr(last)}, timeout=10).json()
        self.events.extend(e for e in data.get("timeline", []) if e["t"] > last)
        for w in data["workers"]:
            self.workers[w["id"]] = w["slots"]
        self.samples.append(Sample(time.time(), dict(data["queues"]), dict(data["service"]),
                                   {w["id"]: len(w["running"]) for w in data["workers"]}))
        return data

    def apps(self) -> list[str]:
        return sorted({e["app"] for e in self.events} | {a for s in self.samples for a in s.queues})

    def slots(self, now: float | None = None) -> list[Slot]:
        """The events paired into stays; a job preempted and resumed makes one stay per slice."""
        now = now or time.time()
        events = sorted(self.events, key=lambda e: e["t"])
        # How each stay ends (the job's next event after its start), to hand a slot over at preemption.
        ending: dict[int, str] = {}
        last_start: dict[str, int] = {}
        for i, e in enumerate(events):
            if e["event"] == "start":
                last_start[e["job"]] = i
            elif e["event"] in ENDS and e["job"] in last_start:
                ending[last_start.pop(e["job"])] = e["event"]
        open_: dict[str, tuple[int, Slot]] = {}
        busy: dict[str, dict[int, str]] = defaultdict(dict)  # worker -> lane -> job
        done: list[Slot] = []
        for i, e in enumerate(events):
            if e["event"] == "start" and e.get("worker"):
                worker = e["worker"]
                lanes = busy[worker]
                free = [n for n in range(self.workers.get(worker, len(lanes) + 1)) if n not in lanes]
                if not free:
                    # The broker sends the waiting request right behind a Preempt, so it starts before the
                    # victim's "preempt" arrives: the slot changes hands now. (Else, an extra row.)
                    victims = [job for job in lanes.values() if ending.get(open_[job][0]) == "preempt"]
                    if victims:
                        _, slot = open_.pop(victims[0])
                        slot.end, slot.how = e["t"], "preempt"
                        done.append(slot)
                        del lanes[slot.lane]
                        free = [slot.lane]
                lane = free[0] if free else next(n for n in range(len(lanes) + 1) if n not in lanes)
                lanes[lane] = e["job"]
                open_[e["job"]] = (i, Slot(worker, lane, e["app"], e["job"], e["t"], e["t"], "running"))
            elif e["event"] in ENDS and e["job"] in open_:
                _, slot = open_.pop(e["job"])
                busy[slot.worker].pop(slot.lane, None)
                slot.end, slot.how, slot.generated = e["t"], e["event"], e.get("generated", 0)
                done.append(slot)
        for _, slot in open_.values():
            slot.end = max(now, slot.start)
            done.append(slot)
        return done
        for slot in open_.values():
            slot.end = max(now, slot.start)
            done.append(slot)
        return done

    def summary(self) -> dict[str, dict[str, float]]:
        """Per app: jobs that got a slot, slot-seconds held, preemptions, tokens at the end of stays."""
        out: dict[str, dict[str, float]] = {}
        for slot in self.slots():
            row = out.setdefault(slot.app, {"jobs": 0, "slot_seconds": 0.0, "preemptions": 0, "finished": 0})
            row["slot_seconds"] = round(row["slot_seconds"] + slot.end - slot.start, 3)
            row["preemptions"] += slot.how == "preempt"
            row["finished"] += slot.how == "end"
        for app in out:
            out[app]["jobs"] = len({e["job"] for e in self.events if e["app"] == app and e["event"] == "start"})
        return out

    def figure(self, figsize: tuple[float, float] | None = None) -> Any:
        """One axes per worker (a row per slot, bars coloured by app), then queue depth, then service."""
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        slots = self.slots()
        workers = sorted(set(self.workers) | {s.worker for s in slots})
        lanes = {w: max([self.workers.get(w, 1)] + [s.lane + 1 for s in slots if s.worker == w]) for w in workers}
        apps = self.apps()
        palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
                   "#CCB974", "#64B5CD"]
        colors = {app: palette[i % len(palette)] for i, app in enumerate(apps)}
        t0 = self.since or min([e["t"] for e in self.events] + [s.t for s in self.samples] or [time.time()])
        heights = [lanes[w] * 0.6 + 0.4 for w in workers] + [1.6, 1.6]
        fig = Figure(figsize=figsize or (10, 1.2 + sum(heights) * 0.9), layout="constrained")
        axes = fig.subplots(len(heights), 1, sharex=True, squeeze=False,
                            gridspec_kw={"height_ratios": heights})[:, 0]
        for ax, worker in zip(axes, workers):
            for app in apps:
                mine = [s for s in slots if s.worker == worker and s.app == app]
                if not mine:
                    continue
                bars = ax.barh([s.lane for s in mine], [max(s.end - s.start, 0.02) for s in mine],
                               left=[s.start - t0 for s in mine], height=0.75, color=colors[app], edgecolor="white",
                               linewidth=0.5)
                for patch, slot in zip(bars.patches, mine):
                    patch.set_gid(app)  # so a figure can be read back: bars per app
                    if slot.how == "preempt":
                        patch.set_hatch("///")
            ax.set_yticks(range(lanes[worker]), [f"slot {i}" for i in range(lanes[worker])])
            ax.set_ylim(-0.6, lanes[worker] - 0.4)
            ax.invert_yaxis()
            ax.set_ylabel(worker, rotation=0, ha="right", va="center", fontweight="bold")
            ax.grid(axis="x", alpha=0.3)
        queue_ax, service_ax = axes[-2], axes[-1]
        times = [s.t - t0 for s in self.samples]
        for app in apps:
            depth = [s.queues.get(app, 0) for s in self.samples]
            service = [s.service.get(app, math.nan) for s in self.samples]
            queue_ax.step(times, depth, where="post", color=colors[app], marker="." if len(times) < 3 else None,
                          label=app)
            service_ax.plot(times, service, color=colors[app], marker="." if len(times) < 3 else None, label=app)
        queue_ax.set_ylabel("queued")
        queue_ax.grid(alpha=0.3)
        service_ax.set_ylabel("service\n(weighted tokens)")
        service_ax.grid(alpha=0.3)
        service_ax.set_xlabel("seconds")
        if apps:
            axes[0].legend(handles=[Patch(color=colors[a], label=a) for a in apps], loc="upper right",
                           fontsize="small", ncols=min(len(apps), 4))
        hatched = any(s.how == "preempt" for s in slots)
        fig.suptitle(f"pool at {self.url}: slots per worker{' (hatched: preempted)' if hatched else ''}, "
                     f"queue depth and service per app", fontsize="medium")
        return fig


def figure_png(fig: Any) -> bytes:
    """A Figure as PNG, without pyplot (so no global figure manager, and no double display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def ensure_figure_display(shell: Any) -> None:
    """Let a Figure returned by a cell show as a picture even where pyplot was never imported."""
    from matplotlib.figure import Figure

    png = shell.display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        png.for_type(Figure, figure_png)


def _finished(until: Any) -> bool:
    if until is None:
        return False
    if isinstance(until, (list, tuple, set)):
        return all(_finished(u) for u in until)
    if hasattr(until, "done"):  # a Future
        return until.done()
    if hasattr(until, "is_alive"):  # a Thread
        return not until.is_alive()
    if callable(until):
        return bool(until())
    raise TypeError(f"until must be a Future, a Thread, a callable or a list of them, not {type(until).__name__}")


def pool_view(gateway: Any, *, since: float | None = None, duration: float | None = None, until: Any = None,
              interval: float = 1.0, live: bool | None = None, figsize: tuple[float, float] | None = None,
              trace: PoolTrace | None = None) -> Any:
    """Plot a gateway's pool: slots per worker coloured by app, queue depth and service over time.

    Without `duration`/`until`, one look (the timeline the gateway still holds, since `since`).
    With them, it polls every `interval` seconds and redraws in the output cell until `until`
    (Futures, Threads, a callable) is done or `duration` seconds have passed, whichever is first. Returns the final Figure;
    its bars carry their app as gid, so `[p.get_gid() for p in fig.axes[0].patches]` reads it back.
    """
    from .streaming import shell

    trace = trace or PoolTrace(base_url(gateway), since or 0.0)
    live = live if live is not None else bool(duration or until is not None)
    started = time.monotonic()
    if until is None and not duration:
        duration = 30.0  # live, with nothing to wait for: a short look
    ip = shell() if live else None
    handle = None

    def draw(fig: Any) -> None:
        nonlocal handle
        if ip is None:
            return
        from IPython.display import Image, display

        image = Image(data=figure_png(fig))
        if handle is None:
            handle = display(image, display_id=True)
        else:
            handle.update(image)

    while True:
        finished = not live or (until is not None and _finished(until)) or (
            bool(duration) and time.monotonic() - started >= duration)
        trace.poll()
        if finished:
            break
        if ip is not None:  # drawing costs CPU the workers could use: only where someone can see it
            draw(trace.figure(figsize))
        time.sleep(interval)
    fig = trace.figure(figsize)
    draw(fig)
    if ip is not None:
        ensure_figure_display(ip)
    return fig


def pool_stats(gateway: Any) -> dict[str, dict[str, float]]:
    """Per app, from the gateway's `/metrics`: requests placed, mean queue wait and time to first
    token (seconds), generated tokens, preemptions and rejections."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url(gateway)}/metrics", timeout=10).text
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            app = sample.labels.get("app")
            if app is not None:
                sums[app][sample.name] += sample.value
    out = {}
    for app, m in sums.items():
        waits = m.get("amphibia_queue_wait_seconds_count", 0.0)
        firsts = m.get("amphibia_time_to_first_token_seconds_count", 0.0)
        out[app] = {
            "requests": int(waits),
            "queue_wait_mean_s": m.get("amphibia_queue_wait_seconds_sum", 0.0) / waits if waits else math.nan,
            "ttft_mean_s": m.get("amphibia_time_to_first_token_seconds_sum", 0.0) / firsts if firsts else math.nan,
            "tokens": int(m.get("amphibia_generated_tokens_total", 0.0)),
            "preemptions": int(m.get("amphibia_preemptions_total", 0.0)),
            "rejections": int(m.get("amphibia_rejections_total", 0.0)),
        }
    return out

