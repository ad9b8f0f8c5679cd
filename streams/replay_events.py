"""Replay of `events`: recommendation lists recomputed with pinned model versions.

Semantics: every user who has an event in the range gets the list they would have had after their
last event in the range. State is folded from the beginning of each partition (a list depends on
the whole history), with the same UserState the live agent uses, in the replay's own memory (the
live `user-state` changelog is never touched). All touched users are then computed in large
batches by operators.recommend_lists (as the live agent's are) and published keyed `user|model@version,...`.
An interrupted events replay simply runs again: folding is fast and the keys are idempotent.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import aclosing
from datetime import datetime
from typing import Any

from operators.errors import BadInput
from operators.model_repository import ModelRepository
from operators.ranking import CandidateRanker
from operators.recommend_lists import ListRecommender
from operators.retrieval import CFRetriever
from operators.user_state import UserState
from streams.config import Settings
from streams.kafka import consumer, ensure_named_topics, ensure_topics, producer, read_range
from streams.replay_range import Bound, pinned, plan_range
from streams.schemas import (
    DEAD_LETTERS,
    EVENTS,
    SourceRecord,
    dead_letter,
    decode_headers,
    dumps,
    parse_event,
)


async def replay_events(settings: Settings, *, output: str, start: Bound, end: Bound, pins: tuple[str, ...] = (),
                        dead_letters: str | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Lists of the users with an event between `start` and `end` into `output`, with the retrieval and
    ranking models pinned by `pins` (NAME@VERSION)."""
    repo = ModelRepository(settings.model_dir)
    refs = pinned([r for r in (settings.retrieval_model, settings.ranking_model) if r], pins,
                  "events replays use the retrieval and ranking models only")
    retriever = CFRetriever.from_repository(repo, refs[settings.retrieval_model])
    ranker = CandidateRanker(repo.load(refs[settings.ranking_model])) if settings.ranking_model else None
    recommender = ListRecommender(retriever, ranker)
    models = recommender.models
    run = json.dumps({"source": settings.topic(EVENTS), "output": output, "from": start.__dict__,
                      "to": end.__dict__, "models": models}, sort_keys=True)
    digest = hashlib.sha256(run.encode()).hexdigest()[:12]
    suffix = "|" + ",".join(sorted(models.values()))
    dead_topic = dead_letters or settings.topic(DEAD_LETTERS)

    topic = settings.topic(EVENTS)
    await ensure_topics(settings)
    await ensure_named_topics(settings, [output, dead_topic])
    kafka = consumer(settings, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=2000)
    out = producer(settings)
    await kafka.start()
    await out.start()
    started = time.monotonic()
    states: dict[str, UserState] = {}
    touched: dict[str, None] = {}  # users with an event in the range, in first-seen order
    counts = {"events_read": 0, "in_range": 0, "dead_letters": 0, "unknown_items": 0}
    try:
        plan = await plan_range(kafka, topic, start, end)
        dead = []
        # state needs the whole history before the range: read every partition from its beginning
        history = {tp: range(plan.beginnings[tp.partition], plan.ends[tp.partition]) for tp in plan.partitions}
        async with aclosing(read_range(kafka, history)) as fetches:
            async for tp, records in fetches:
                for r in records:
                    counts["events_read"] += 1
                    in_range = plan.selects(tp.partition, r.offset, r.timestamp)
                    try:
                        event = parse_event(r.value)
                    except BadInput as exc:
                        if in_range:  # bad records in the range: dead letters, as live
                            source = SourceRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, decode_headers(r.headers), r.value)
                            dead.append(await out.send(dead_topic, dumps(dead_letter(source, exc.reason, exc.detail, "replay")), key=r.key))
                            counts["dead_letters"] += 1
                        continue
                    row = retriever.item_index.rows([event["item_id"]])[0]
                    if row < 0:
                        counts["unknown_items"] += 1
                        continue
                    state = states.setdefault(event["user_id"], UserState(event["user_id"]))
                    state.apply(event, r.offset, str(int(retriever.item_categories[row])))
                    if in_range:
                        counts["in_range"] += 1
                        touched.setdefault(event["user_id"])
        deliveries = list(dead)
        users = list(touched)
        batch = max(256, batch_size * 4)
        for i in range(0, len(users), batch):
            chunk = [states[u] for u in users[i:i + batch]]
            for state, made in zip(chunk, recommender.lists(chunk, [settings.rec_k] * len(chunk)), strict=True):
                record = made.record(reason="replay", request_id=None, replay={"run": digest},
                                     generated_at=datetime.fromisoformat(state.last_ts).isoformat() if state.last_ts else None)
                deliveries.append(await out.send(output, dumps(record), key=(state.user_id + suffix).encode()))
        for delivery in deliveries:
            await delivery
    finally:
        await kafka.stop()
        await out.stop()
    elapsed = time.monotonic() - started
    return {**counts, "users": len(touched), "lists": len(touched), "seconds": round(elapsed, 3),
            "records_per_s": round(counts["events_read"] / elapsed, 1) if elapsed > 0 else None, "complete": True,
            "source": topic, "output": output, "run": digest, "models": models, "time_range_method": plan.method,
            "from": start.describe(), "to": end.describe()}
