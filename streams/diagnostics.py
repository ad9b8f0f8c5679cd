"""What a running worker is waiting on, on demand: `kill -USR1 <pid>` logs it, `GET /debug/state` returns it
(`?tasks=0`: the consumer only, cheap enough to poll). Where its memory is: `GET /debug/memory`.

A worker that holds partitions with lag and does nothing shows no exception and, under py-spy, only
threads waiting on the event loop: the answer is in its asyncio tasks and in the consumer's
bookkeeping. So this reports both:

- every task's innermost frames, identical stacks grouped with a count (a worker has thousands of
  tasks, most of them records waiting for their batch or their debounced list);
- per assigned partition: whether Faust fetches it (active, paused, buffered), aiokafka's position and
  high watermark, Faust's read and committed offsets, acked offsets not yet committed, and gaps;
- whether the flow is suspended (a rebalance in progress) and how many messages are unacked.

Reads private Faust and aiokafka state (faust-streaming 0.15.3, pinned): nothing is changed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import tracemalloc
from collections import Counter
from typing import Any

import faust
from faust.web import Request, Response, View

from streams.batches import fetch_states
from streams.memory import allocator, malloc_stats, rss_bytes
from streams.serving_api import ApiError

log = logging.getLogger(__name__)

STACK_FRAMES = 6  # innermost frames per task: enough to see what it awaits


def task_stacks(limit: int = STACK_FRAMES) -> list[dict[str, Any]]:
    """Every pending task of the running loop as its await chain (innermost `limit` frames first, then
    what the innermost awaits), identical ones grouped, most first."""
    groups: Counter[tuple[str, ...]] = Counter()
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        groups[(getattr(coro, "__qualname__", type(coro).__name__), *_await_chain(coro, limit))] += 1
    return [{"count": n, "coroutine": key[0], "frames": list(key[1:])} for key, n in groups.most_common()]


def _await_chain(coro: Any, limit: int) -> list[str]:
    """The frames a suspended coroutine is awaiting through (Task.get_stack gives only the outermost),
    innermost first, then what the innermost awaits (a future, an event). Wrappers without a frame of
    their own (an async generator's `asend`, the `coroutine_wrapper` of an awaitable object) are seen
    through by the coroutine or generator they hold."""
    frames, node = [], coro
    for _ in range(64):  # a bound: await chains are short, but never loop on a cycle
        frame = next((f for a in ("cr_frame", "ag_frame", "gi_frame") if (f := getattr(node, a, None)) is not None), None)
        if frame is None:
            held = [r for r in gc.get_referents(node) if any(getattr(r, a, None) is not None
                                                             for a in ("cr_frame", "ag_frame", "gi_frame"))]
            if len(held) != 1:
                break
            node = held[0]
            continue
        frames.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        node = next((n for a in ("cr_await", "ag_await", "gi_yieldfrom") if (n := getattr(node, a, None)) is not None), None)
        if node is None:
            break
    chain = frames[::-1][:limit]
    return chain + [f"awaits {type(node).__name__}"] if node is not None else chain


def consumer_state(app: faust.App) -> dict[str, Any]:
    """The consumer's view of each assigned partition, and the flow."""
    consumer = app.consumer
    thread = getattr(consumer, "_thread", None)
    kafka = getattr(thread, "_ensure_consumer", lambda: None)() if thread is not None else None
    active = consumer._active_partitions or set()
    partitions = []
    for tp in sorted(consumer.assignment()):
        row: dict[str, Any] = {
            "topic": tp.topic, "partition": tp.partition,
            "fetching": tp in active, "paused": tp in consumer._paused_partitions,
            "buffered": tp in consumer._buffered_partitions, "held": tp in getattr(consumer, "held_partitions", ()),
            "read_offset": consumer._read_offset.get(tp), "committed": consumer._committed_offset.get(tp),
            "acked_not_committed": len(consumer._acked.get(tp, ())),
            "gaps": len(consumer._gap.get(tp, ())), "highwater": consumer.highwater(tp),
        }
        if kafka is not None:
            try:
                fetcher = kafka._fetcher
                tp_state = fetch_states(kafka).state_value(tp)
                row["position"] = tp_state.position if tp_state.has_valid_position else None
                row["aiokafka_paused"] = tp_state.paused
                row["awaiting_reset"] = tp_state.awaiting_reset
                # what aiokafka has prefetched for it: a FetchResult waiting to be taken, or an error
                row["prefetched"] = repr(fetcher._records.get(tp)) if tp in fetcher._records else None
            except Exception as exc:  # noqa: BLE001 - diagnostics must never fail the worker
                row["position"] = f"unknown ({type(exc).__name__})"
        partitions.append(row)
    return {
        "flow_active": consumer.flow_active, "flow_control_active": app.flow_control.is_active(),
        "suspended": consumer.suspend_flow.is_set(), "rebalancing": app.rebalancing,
        "unacked_messages": len(consumer._unacked_messages), "generation": app.consumer_generation_id,
        "fetches_in_flight": sorted(kafka._fetcher._in_flight) if kafka is not None else None,
        # raised by the batching consumer when fetches come back empty on partitions with lag
        "fetch_max_wait_ms": kafka._fetcher._fetch_max_wait_ms if kafka is not None else None,
        "partitions": partitions,
    }


def state(app: faust.App, tasks: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"tasks": task_stacks() if tasks else []}
    try:
        out["consumer"] = consumer_state(app)
    except Exception as exc:  # noqa: BLE001 - e.g. before the consumer exists
        out["consumer"] = f"unavailable: {type(exc).__name__}: {exc}"
    return out


def log_state(app: faust.App) -> None:
    report = state(app)
    lines = ["diagnostics (SIGUSR1):", f"consumer: {report['consumer'] if isinstance(report['consumer'], str) else ''}"]
    if isinstance(report["consumer"], dict):
        c = report["consumer"]
        lines.append(f"  flow_active={c['flow_active']} flow_control_active={c['flow_control_active']} "
                     f"suspended={c['suspended']} rebalancing={c['rebalancing']} unacked={c['unacked_messages']} "
                     f"generation={c['generation']}")
        lines += [f"  {p}" for p in c["partitions"]]
    lines.append(f"tasks: {sum(t['count'] for t in report['tasks'])}")
    for t in report["tasks"]:
        lines.append(f"  {t['count']:5d} x {t['coroutine']}")
        lines += [f"          {frame}" for frame in t["frames"]]
    log.warning("\n".join(lines))


def memory_state(objects: bool = False, top: int = 20) -> dict[str, Any]:
    """Resident memory against what Python holds live: RSS that grows while the live blocks do not is
    memory freed but kept (allocator fragmentation); live blocks that grow are objects kept.

    `python_blocks` is cheap (a counter): poll it. `objects` walks every object the collector tracks
    (a few hundred ms for a worker's millions) and counts them by type. Under `PYTHONTRACEMALLOC=1`
    (which costs speed and memory) it adds the `top` source lines holding the most memory."""
    out: dict[str, Any] = {"rss_bytes": rss_bytes(), "allocator": allocator(os.getpid()), "malloc": malloc_stats(),
                           "python_blocks": sys.getallocatedblocks(), "gc_generations": list(gc.get_count())}
    if objects:
        by_type = Counter(type(o).__qualname__ for o in gc.get_objects())
        out["gc_objects"] = sum(by_type.values())
        out["gc_objects_by_type"] = dict(by_type.most_common(top))
    if tracemalloc.is_tracing():
        current, peak = tracemalloc.get_traced_memory()
        stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
        out["traced"] = {"current_bytes": current, "peak_bytes": peak,
                         "top": [{"where": str(s.traceback[0]), "bytes": s.size, "blocks": s.count} for s in stats]}
    return out


def install(app: faust.App) -> None:
    """SIGUSR1 logs the state (the worker's loop runs in the main thread); GET /debug/state returns it
    (task stacks name only files and functions: nothing of the records or the configuration)."""

    @app.task
    async def on_usr1() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, log_state, app)

    @app.page("/debug/state")
    class DebugState(View):
        async def get(self, request: Request) -> Response:
            return self.json(state(app, tasks=request.query.get("tasks", "1") not in ("0", "false")))

    @app.page("/debug/memory")
    class DebugMemory(View):
        async def get(self, request: Request) -> Response:
            objects = request.query.get("objects", "0")
            if objects not in ("0", "1", "false", "true"):
                error = ApiError(400, "bad_query", f"objects must be 0, 1, false or true, not {objects!r}")
                return self.json(error.body(), status=error.status)
            return self.json(memory_state(objects=objects in ("1", "true")))
