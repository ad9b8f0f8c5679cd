"""The soak's books: every input by (topic, partition, offset), and every output matched back to it.

A post or frame is accounted for when a verdict or a dead letter names its offset; otherwise it is
lost. A second output for the same input is a duplicate: identical apart from the timing fields
(what at-least-once allows), or not. Events have no output of their own: a good event is accounted
for by its user's state. Each user-state snapshot says how many events it holds (`n_events`) up to
which offset (`last_offset`); it must equal the number of good events of that user sent up to that
offset (none skipped, none applied twice), and the user's last snapshot must hold all of them.
Memory stays flat per input: numpy columns indexed by offset, one 64-bit hash per input.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

# Fields that differ between two runs of the same input (when, where, how long), not what was decided.
TIMING_FIELDS = {"latency_ms", "produced_at_ms", "worker", "failed_at_ms", "generated_at"}
GOOD = -1  # `variant` of an input that should get a result (poison records hold their variant's index)
NO_INPUT = -2


def _digest(value: Any) -> int:
    return int.from_bytes(hashlib.blake2b(orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=8).digest(), "little")


def content_hashes(record: dict) -> tuple[int, int]:
    """(hash without timing fields, the same also without model versions): a rewrite whose first hash
    differs but second matches was judged by another version of a model (a hot swap between the two)."""
    content = {k: v for k, v in record.items() if k not in TIMING_FIELDS}
    models = content.get("models")
    unversioned = dict(content)
    if isinstance(models, dict):
        unversioned["models"] = {c: {k: v for k, v in (m or {}).items() if k not in ("version", "arm")}
                                 for c, m in models.items()}
    if isinstance(content.get("violations"), list):  # each names its model as name@version
        unversioned["violations"] = [{**v, "model": str(v.get("model", "")).split("@")[0]} if isinstance(v, dict) else v
                                     for v in content["violations"]]
    return _digest(content), _digest(unversioned)


@dataclass
class Column:
    """Per-offset facts of one partition, grown as offsets arrive (outputs may be read before the
    producer's acknowledgement of their input is)."""

    variant: np.ndarray = field(default_factory=lambda: np.full(0, NO_INPUT, np.int16))
    seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    results: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))  # verdicts / snapshots
    dead: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    hash_full: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    hash_unversioned: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def reach(self, offset: int) -> None:
        if offset < len(self.variant):
            return
        n = max(offset + 1, 2 * len(self.variant), 1024)
        for name, fill in (("variant", NO_INPUT), ("seq", 0), ("results", 0), ("dead", 0), ("hash_full", 0),
                           ("hash_unversioned", 0)):
            old = getattr(self, name)
            new = np.full(n, fill, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)


class Ledger:
    def __init__(self, kinds: dict[str, str], started_ms: int) -> None:
        """`kinds`: input topic name -> kind (frames, posts, events)."""
        self.kinds = kinds
        self.started_ms = started_ms
        self.columns: dict[tuple[str, int], Column] = defaultdict(Column)
        self.send_failed: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()  # "<kind> identical" / "<kind> other version" / "<kind> differ"
        self.differing: list[dict] = []
        self.wrong_ids: list[dict] = []
        self.dead_reasons: Counter[tuple[str, str]] = Counter()
        self.poison_reasons: Counter[tuple[str, str]] = Counter()  # (variant name, reason)
        self.good_dead_lettered: list[dict] = []
        self.lists: Counter[str] = Counter()
        self.versions: Counter[tuple[str, str, str]] = Counter()  # (check, model@version, minute) for the hot swap
        self.latency: dict[tuple[str, int], list[float]] = defaultdict(list)  # (kind, minute) -> end-to-end ms
        self.sent_per_minute: Counter[tuple[str, int]] = Counter()
        self.done_per_minute: Counter[tuple[str, int]] = Counter()
        self.poison_names: dict[str, list[str]] = {}
        self.answered: Counter[str] = Counter()  # inputs with a first result or dead letter, per kind
        self._dead_hashes: dict[tuple[str, int, int], int] = {}  # dead letters are rare: kept by source
        # events: good events' offsets per user; every snapshot as (user, last_offset, n_events); last per user
        self.users: dict[str, int] = {}
        self.event_offsets: dict[int, array] = defaultdict(lambda: array("q"))
        self.snapshots = (array("i"), array("i"), array("q"), array("i"), array("q"))  # user, partition, last_offset, n, ts
        self.last_snapshot: dict[int, tuple[int, int]] = {}  # user -> (last_offset, n_events), in topic order
        self.most_applied: dict[int, int] = {}
        self.good_events_sent = 0
        self.events_applied = 0
        self.state_rewrites = 0

    def minute(self, ms: int) -> int:
        return max(0, int((ms - self.started_ms) // 60000))

    # ------------------------------------------------------------------------------------- inputs
    def user(self, user_id: str) -> int:
        return self.users.setdefault(user_id, len(self.users))

    def sent(self, topic: str, partition: int, offset: int, seq: int, variant: int, at_ms: int, key: bytes) -> None:
        col = self.columns[(topic, partition)]
        col.reach(offset)
        col.variant[offset], col.seq[offset] = variant, seq
        if self.kinds[topic] == "events" and variant == GOOD:
            self.event_offsets[self.user(key.decode())].append(offset)
            self.good_events_sent += 1
        self.sent_per_minute[(self.kinds[topic], self.minute(at_ms))] += 1

    # ------------------------------------------------------------------------------------ outputs
    def _result(self, topic: str, partition: int, offset: int, record: dict, kind: str, at_ms: int) -> Column:
        col = self.columns[(topic, partition)]
        col.reach(offset)
        full, unversioned = content_hashes(record)
        if col.results[offset] == 0:
            col.hash_full[offset], col.hash_unversioned[offset] = full, unversioned
            self.done_per_minute[(kind, self.minute(at_ms))] += 1
            self.answered[kind] += int(col.dead[offset] == 0)
        elif col.hash_full[offset] == full:
            self.duplicates[f"{kind} identical"] += 1
        elif col.hash_unversioned[offset] == unversioned:
            self.duplicates[f"{kind} other model version"] += 1
        else:
            self.duplicates[f"{kind} differ"] += 1
            if len(self.differing) < 20:
                self.differing.append({"topic": topic, "partition": partition, "offset": offset, "record": record})
        col.results[offset] = min(int(col.results[offset]) + 1, 65535)
        return col

    def verdict(self, v: dict, expected_id) -> None:
        src = v["source"]
        kind = self.kinds.get(src["topic"], "?")
        col = self._result(src["topic"], src["partition"], src["offset"], v, kind, v["produced_at_ms"])
        if col.results[src["offset"]] == 1:
            self.latency[(kind, self.minute(v["produced_at_ms"]))].append(v["latency_ms"]["end_to_end"])
            for check, model in (v.get("models") or {}).items():
                self.versions[(check, f"{model.get('name')}@{model.get('version')}", str(self.minute(v["produced_at_ms"])))] += 1
        if col.variant[src["offset"]] != NO_INPUT and v["id"] != expected_id(kind, int(col.seq[src["offset"]])):
            self.wrong_ids.append({"source": src, "id": v["id"]})

    def snapshot(self, events_topic: str, partition: int, state: dict, at_ms: int) -> None:
        """A user-state record (on the partition number of the user's events partition): the user's state
        after its `n_events`-th event, the last applied at offset `last_offset`."""
        user, last_offset, n = self.user(state["user_id"]), int(state["last_offset"]), int(state["n_events"])
        for column, value in zip(self.snapshots, (user, partition, last_offset, n, at_ms), strict=True):
            column.append(value)
        col = self.columns[(events_topic, partition)]
        col.reach(last_offset)
        col.results[last_offset] = min(int(col.results[last_offset]) + 1, 65535)
        previous = self.last_snapshot.get(user)
        if previous is not None and last_offset <= previous[0]:
            self.state_rewrites += 1  # applied again after a crash lost the snapshot in flight, or a stale copy
        self.last_snapshot[user] = (last_offset, n)
        more = n - self.most_applied.get(user, 0)
        if more > 0:
            self.most_applied[user] = n
            self.events_applied += more
            self.answered["events"] += more
            self.done_per_minute[("events", self.minute(at_ms))] += more

    def save_event_evidence(self, path) -> None:
        """Every snapshot and every good event's offset, for a post-mortem of a state that lost events."""
        names = np.array(sorted(self.users, key=self.users.get))
        users = np.concatenate([np.full(len(a), u, np.int32) for u, a in self.event_offsets.items()] or [np.zeros(0, np.int32)])
        offsets = np.concatenate([np.frombuffer(a, np.int64) for a in self.event_offsets.values()] or [np.zeros(0, np.int64)])
        user, partition, last, n, ts = (np.frombuffer(a, a.typecode == "q" and np.int64 or np.int32) for a in self.snapshots)
        np.savez_compressed(path, user_names=names, event_user=users, event_offset=offsets, snapshot_user=user,
                            snapshot_partition=partition, snapshot_last_offset=last, snapshot_n_events=n, snapshot_ts_ms=ts)

    def dead_letter(self, d: dict) -> None:
        src = d.get("source") or {}
        kind = self.kinds.get(src.get("topic"), "?")
        self.dead_reasons[(kind, d.get("reason", "?"))] += 1
        if "offset" not in src or kind == "?":
            return
        col = self.columns[(src["topic"], src["partition"])]
        col.reach(src["offset"])
        full, _ = content_hashes(d)
        where = (src["topic"], src["partition"], src["offset"])
        if col.dead[src["offset"]] == 0:
            self.done_per_minute[(kind, self.minute(d.get("failed_at_ms", self.started_ms)))] += 1
            self.answered[kind] += int(col.results[src["offset"]] == 0)
            self._dead_hashes[where] = full
        elif self._dead_hashes.get(where) == full:
            self.duplicates[f"{kind} dead letter identical"] += 1
        else:
            self.duplicates[f"{kind} dead letter differ"] += 1
            if len(self.differing) < 20:
                self.differing.append({"topic": src["topic"], "partition": src["partition"], "offset": src["offset"],
                                       "record": d})
        col.dead[src["offset"]] = min(int(col.dead[src["offset"]]) + 1, 65535)
        variant = int(col.variant[src["offset"]])
        if variant >= 0:
            self.poison_reasons[(self.poison_names[kind][variant], d.get("reason", "?"))] += 1
        elif variant == GOOD and len(self.good_dead_lettered) < 20:
            self.good_dead_lettered.append({"source": src, "reason": d.get("reason"), "detail": d.get("detail")})

    def recommendation(self, body: dict) -> None:
        self.lists[str(body.get("reason", "?")).split(":")[0]] += 1

    # ------------------------------------------------------------------------------------ books
    def unaccounted(self) -> int:
        """Inputs still waiting for their result (events: good ones not yet in their user's state)."""
        waiting = self.good_events_sent - self.events_applied
        for (topic, _), c in self.columns.items():
            owed = (c.variant != NO_INPUT) if self.kinds.get(topic) != "events" else (c.variant >= 0)
            waiting += int(np.count_nonzero(owed & (c.results == 0) & (c.dead == 0)))
        return waiting

    def event_books(self) -> dict[str, Any]:
        """Every snapshot against the good events sent to its user up to its offset; each user's last
        snapshot against all of them."""
        offsets = {u: np.sort(np.frombuffer(a, np.int64)) for u, a in self.event_offsets.items()}
        users, _, last, n, _ = (np.frombuffer(a, np.int64 if a.typecode == "q" else np.int32) for a in self.snapshots)
        wrong, examples = 0, []
        names = {i: u for u, i in self.users.items()}
        for i in range(len(users)):
            expected = int(np.searchsorted(offsets.get(int(users[i]), np.zeros(0, np.int64)), last[i], side="right"))
            if expected != n[i]:
                wrong += 1
                if len(examples) < 20:
                    examples.append({"user": names[int(users[i])], "last_offset": int(last[i]), "n_events": int(n[i]),
                                     "good_events_sent_up_to_it": expected})
        missing, never, extra, short_users = 0, 0, 0, []
        for u, sent in offsets.items():
            held = self.last_snapshot.get(u, (-1, 0))[1]  # what a recovery reads: the last snapshot in topic order
            missing += max(0, len(sent) - held)
            never += max(0, len(sent) - self.most_applied.get(u, 0))  # in no snapshot at all
            extra += max(0, held - len(sent))
            if held < len(sent) and len(short_users) < 20:
                short_users.append({"user": names[u], "good_events_sent": len(sent), "last_snapshot_n_events": held,
                                    "most_n_events_in_any_snapshot": self.most_applied.get(u, 0),
                                    "first_missing_offset": int(sent[held])})
        return {"snapshots": len(users), "snapshots_with_wrong_count": wrong, "wrong_count_examples": examples,
                "state_rewrites": self.state_rewrites, "good_events_missing_from_final_state": missing,
                "good_events_in_no_snapshot": never, "events_applied_twice_in_final_state": extra,
                "users_short": short_users}

    def books(self) -> dict[str, Any]:
        """Per kind: inputs, poison, results, dead letters, lost (with the first lost offsets), orphans."""
        out: dict[str, Any] = {}
        for (topic, partition), c in sorted(self.columns.items()):
            kind = self.kinds.get(topic)
            if kind is None:
                continue
            k = out.setdefault(kind, {"topic": topic, "inputs": 0, "good": 0, "poison": 0, "good_with_result": 0,
                                      "good_dead_lettered": 0, "poison_dead_lettered": 0, "poison_with_result": 0,
                                      "lost": 0, "lost_examples": [], "outputs_without_input": 0})
            sent = c.variant != NO_INPUT
            good, poison = c.variant == GOOD, c.variant >= 0
            k["inputs"] += int(sent.sum())
            owed = poison if kind == "events" else sent  # good events: accounted for by their users' states
            k["good"] += int(good.sum())
            k["poison"] += int(poison.sum())
            k["good_with_result"] += int((good & (c.results > 0)).sum())
            k["good_dead_lettered"] += int((good & (c.results == 0) & (c.dead > 0)).sum())
            k["poison_dead_lettered"] += int((poison & (c.dead > 0)).sum())
            k["poison_with_result"] += int((poison & (c.results > 0)).sum())
            lost = np.flatnonzero(owed & (c.results == 0) & (c.dead == 0))
            k["lost"] += int(lost.size)
            for offset in lost[: max(0, 20 - len(k["lost_examples"]))]:
                k["lost_examples"].append({"partition": partition, "offset": int(offset), "seq": int(c.seq[offset]),
                                           "variant": int(c.variant[offset])})
            k["outputs_without_input"] += int((~sent & ((c.results > 0) | (c.dead > 0))).sum())
        if "events" in out:
            events = self.event_books()
            out["events"].update(events)
            out["events"]["good_with_result"] = out["events"]["good"] - events["good_events_missing_from_final_state"]
            out["events"]["lost"] += events["good_events_missing_from_final_state"]
        return out

    def latency_per_minute(self) -> list[dict[str, Any]]:
        rows = []
        for (kind, minute), values in sorted(self.latency.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            a = np.asarray(values, float)
            rows.append({"minute": minute, "kind": kind, "n": int(a.size), "p50_ms": float(np.percentile(a, 50)),
                         "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())})
        return rows
