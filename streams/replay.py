"""Replay / backfill: re-process a range of a topic with pinned model versions into a chosen topic.

- Reads with manual partition assignment and no consumer group: live workers' offsets are never
  touched. It runs the live pipeline's own code (ModerationPipeline, the same operators and policy),
  so a replay and the live path cannot drift apart.
- Stops by itself at the end of the range (planned in streams/replay_range.py: offsets, or record
  timestamps, up to the high watermark when the replay starts).
- Outputs are keyed `id|model@version,...`: idempotent when run twice, and distinct per version set.
- A checkpoint file records, per partition, the next offset whose output (or dead letter) is on the
  broker; it is written only after delivery, so a resumed replay neither skips nor loses records.
- `--source events` recomputes recommendation lists instead (streams/replay_events.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from operators.model_repository import ModelRepository
from operators.moderation import Moderator
from operators.policy import Policy, PolicyError
from streams.config import Settings
from streams.cores import share_cores
from streams.kafka import PartitionsByKey, consumer, ensure_named_topics, ensure_topics, producer, read_range
from streams.moderation import ModerationPipeline
from streams.ordered import OrderedAcker, Output
from streams.replay_events import replay_events
from streams.replay_range import Bound, RangePlan, ReplayError, pinned, plan_range
from streams.schemas import DEAD_LETTERS, EVENTS, FRAMES, POSTS, SourceRecord, decode_headers

log = logging.getLogger(__name__)

SOURCES = (POSTS, FRAMES, EVENTS)


@dataclass
class PartitionRange:
    partition: int
    start: int  # first offset to read
    end: int  # high watermark at start: read offsets < end
    next: int  # resume point: every offset below it is done (checkpointed)

    @property
    def total(self) -> int:
        return max(0, self.end - self.start)


# ------------------------------------------------------------------------------------- checkpoint
@dataclass
class Checkpoint:
    path: Path
    run: dict[str, Any]
    next: dict[int, int] = field(default_factory=dict)
    done: bool = False

    @classmethod
    def load(cls, path: Path, run: dict[str, Any]) -> Checkpoint:
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("run") != run:
                raise ReplayError(f"checkpoint {path} belongs to a different replay; pass --restart or another --checkpoint")
            return cls(path, run, {int(p): o for p, o in data["next"].items()}, bool(data.get("done")))
        return cls(path, run)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run": self.run, "next": self.next, "done": self.done}, indent=1))
        os.replace(tmp, self.path)  # atomic: a kill leaves the old or the new file, never half of one


class _Done:
    """What OrderedAcker acks for a replayed record: moves the partition's checkpoint past it."""

    __slots__ = ("checkpoint", "partition", "offset", "bar")

    def __init__(self, checkpoint: Checkpoint, partition: int, offset: int, bar: tqdm | None) -> None:
        self.checkpoint, self.partition, self.offset, self.bar = checkpoint, partition, offset, bar

    def ack(self) -> None:
        self.checkpoint.next[self.partition] = self.offset + 1
        if self.bar is not None:
            self.bar.update(1)


async def _outputs_of(handle_batch, sources: list[SourceRecord | None]) -> list[list[Output]]:
    """The outputs of each source, in order (none for a None), from one `handle_batch` call."""
    results = iter(await handle_batch([s for s in sources if s is not None]))
    return [[] if source is None else next(results) for source in sources]


# ----------------------------------------------------------------------------------------- replay
@dataclass
class ReplayOptions:
    source: str
    output: str
    start: Bound = field(default_factory=Bound)
    end: Bound = field(default_factory=Bound)
    policy: str | None = None
    models: tuple[str, ...] = ()  # NAME@VERSION pins replacing the policy's choice for NAME
    checkpoint: Path | None = None
    restart: bool = False
    batch_size: int = 64  # replays are throughput-bound: large batches
    progress: bool = True
    dead_letters: str | None = None
    checkpoint_interval_s: float = 1.0


def pinned_policy(policy: Policy, pins: tuple[str, ...]) -> Policy:
    """The policy with each check's model replaced by the pinned NAME@VERSION of the same name."""
    models = pinned((c.model for c in policy.checks), pins, "no check of the policy uses that model")
    return dataclasses.replace(policy, checks=tuple(dataclasses.replace(c, model=models[c.model]) for c in policy.checks))


def run_id(options: ReplayOptions, settings: Settings) -> dict[str, Any]:
    return {"source": settings.topic(options.source), "output": options.output, "from": options.start.__dict__,
            "to": options.end.__dict__, "models": sorted(options.models), "policy": str(Path(options.policy or settings.policy).resolve())}


async def replay(settings: Settings, options: ReplayOptions) -> dict[str, Any]:
    if options.source not in SOURCES:
        raise ReplayError(f"--source must be one of {', '.join(SOURCES)}")
    if options.source == EVENTS:
        return await replay_events(settings, output=options.output, start=options.start, end=options.end,
                                   pins=options.models, dead_letters=options.dead_letters, batch_size=options.batch_size)
    policy = pinned_policy(Policy.load(options.policy or settings.policy), options.models)
    run = run_id(options, settings)
    digest = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:12]
    ckpt_path = options.checkpoint or Path(settings.data_dir) / "replay" / f"{digest}.json"
    if options.restart and ckpt_path.exists():
        ckpt_path.unlink()
    checkpoint = Checkpoint.load(ckpt_path, run)

    share_cores(settings)
    moderator = Moderator(ModelRepository(settings.model_dir), policy, settings.provider_list,
                          settings.intra_op_threads or None)
    for stage in moderator.stages.values():
        stage.batcher.max_batch_size = max(stage.batcher.max_batch_size, options.batch_size)
        stage.batcher.max_wait_s = max(stage.batcher.max_wait_s, 0.02)
    dead_letters = options.dead_letters or settings.topic(DEAD_LETTERS)
    pipeline = ModerationPipeline(settings, moderator, verdicts_topic=options.output, dead_letters_topic=dead_letters,
                                  versioned_keys=True, extra={"replay": {"run": digest, "policy": policy.source}})
    handle = pipeline.handle_posts if options.source == POSTS else pipeline.handle_frames

    await ensure_topics(settings)
    await ensure_named_topics(settings, [options.output, dead_letters])
    kafka = consumer(settings, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                     max_poll_records=options.batch_size * 4)
    out = producer(settings)
    await kafka.start()
    await out.start()
    try:
        plan = await plan_range(kafka, settings.topic(options.source), options.start, options.end)
        ranges = {p: PartitionRange(p, plan.starts[p], plan.ends[p], max(plan.starts[p], checkpoint.next.get(p, plan.starts[p])))
                  for p in plan.beginnings}
        summary = await _process(kafka, out, plan, ranges, options, checkpoint, handle)
    finally:
        await kafka.stop()
        await out.stop()
        await pipeline.close()
    summary.update({"source": plan.topic, "output": options.output, "time_range_method": plan.method,
                    "from": options.start.describe(), "to": options.end.describe(), "checkpoint": str(ckpt_path),
                    "models": moderator.model_info, "run": digest,
                    "partitions": {p: {"start": r.start, "end": r.end} for p, r in ranges.items()}})
    return summary


async def _process(kafka, out, plan: RangePlan, ranges: dict[int, PartitionRange], options: ReplayOptions,
                   checkpoint: Checkpoint, handle) -> dict[str, Any]:
    partition_of = PartitionsByKey(out.partitions_for)

    async def send(output: Output):
        partition = output.partition
        if partition is None and output.partition_key is not None:
            partition = await partition_of(output.topic, output.partition_key)
        return await out.send(output.topic, output.value, key=output.key, headers=output.headers, partition=partition)

    acker = OrderedAcker(send, max_in_flight=max(256, options.batch_size * 4), name=plan.topic)
    delivering = asyncio.ensure_future(acker.run())
    bars = {p: tqdm(total=r.total, initial=r.next - r.start, desc=f"partition {p}", unit="rec", position=i, leave=True,
                    file=sys.stderr, dynamic_ncols=True)
            for i, (p, r) in enumerate(sorted(ranges.items()))} if options.progress else {}
    selected = skipped = 0
    started = time.monotonic()
    saver = asyncio.ensure_future(_save_every(checkpoint, options.checkpoint_interval_s))
    try:
        for p, r in ranges.items():
            checkpoint.next.setdefault(p, r.next)
        unread = {tp: range(ranges[tp.partition].next, ranges[tp.partition].end) for tp in plan.partitions}
        async with aclosing(read_range(kafka, unread, max_records=options.batch_size * 4)) as fetches:
            async for tp, records in fetches:
                done = [_Done(checkpoint, tp.partition, rec.offset, bars.get(tp.partition)) for rec in records]
                sources: list[SourceRecord | None] = []  # None: outside the time range, no outputs
                for rec in records:
                    if plan.selects(tp.partition, rec.offset, rec.timestamp):
                        sources.append(SourceRecord(rec.topic, rec.partition, rec.offset, rec.timestamp, rec.key,
                                                    decode_headers(rec.headers), rec.value))
                        selected += 1
                    else:
                        sources.append(None)
                        skipped += 1
                await acker.add_batch(done, _outputs_of(handle, sources))
        await acker.idle()
        checkpoint.done = True
    finally:
        saver.cancel()
        delivering.cancel()
        checkpoint.save()
        for bar in bars.values():
            bar.close()
    elapsed = time.monotonic() - started
    return {"selected": selected, "outside_time_range": skipped, "seconds": round(elapsed, 3),
            "records_per_s": round((selected + skipped) / elapsed, 1) if elapsed > 0 else None, "complete": checkpoint.done}


async def _save_every(checkpoint: Checkpoint, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        checkpoint.save()


def run_replay(settings: Settings, options: ReplayOptions) -> dict[str, Any]:
    try:
        return asyncio.run(replay(settings, options))
    except PolicyError as exc:
        raise ReplayError(str(exc)) from exc
