"""Stream alerts (operators/alerts.py): the k-of-n start / m-absent end rule, checked against a
brute-force reading of the rule over whole sequences, plus idempotence and snapshot recovery."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.alerts import AlertRule, JudgedFrame, StreamAlerts
from operators.policy import Policy, PolicyError


def frame(index: int, *hits: tuple[str, str, float], stream: str = "cam-1", offset: int | None = None) -> JudgedFrame:
    return JudgedFrame(stream, index, f"{stream}:{index}", 0, index if offset is None else offset,
                       1_700_000_000_000 + index * 200, index / 5, tuple(hits))


MISSILE = ("forbidden_objects", "missile", 0.6)


def run(presence: list[bool], rule: AlertRule, score_of=lambda i: 0.5) -> list[dict]:
    state, alerts = StreamAlerts("cam-1"), []
    for i, present in enumerate(presence):
        alerts += state.apply(frame(i, *([("objects", "x", score_of(i))] if present else [])), rule)
    return alerts


def reference(presence: list[bool], k: int, n: int, m: int) -> list[tuple[str, int, int]]:
    """The rule read literally over the whole sequence: (event, first present index, last present index)."""
    events, open_since, floor = [], None, 0
    for t, present in enumerate(presence):
        if open_since is None:
            window = range(max(floor, t - n + 1), t + 1)
            if present and sum(presence[i] for i in window) >= k:
                first = min(i for i in window if presence[i])
                events.append(("start", first, t))
                open_since, episode_first = t, first
        elif t - m + 1 > open_since and not any(presence[t - m + 1 : t + 1]):
            last = max(i for i in range(open_since, t - m + 1) if presence[i])
            events.append(("end", episode_first, last))
            open_since, floor = None, t + 1
    return events


def summary(alerts: list[dict]) -> list[tuple[str, int, int]]:
    return [(a["event"], a["first"]["frame_index"], a["last"]["frame_index"]) for a in alerts]


def test_an_object_in_three_of_five_frames_starts_one_alert_and_ten_quiet_frames_end_it():
    presence = [False] * 4 + [True, False, True, True] + [True] * 6 + [False] * 12
    alerts = run(presence, AlertRule(k=3, n=5, m=10))
    assert summary(alerts) == [("start", 4, 7), ("end", 4, 13)]
    start, end = alerts
    assert start["decided_at_frame"] == 7 and end["decided_at_frame"] == 23
    assert start["id"] == "cam-1:4:objects:x:start" and end["id"] == "cam-1:4:objects:x:end"
    assert start["episode"] == end["episode"] and end["frames_present"] == 9
    assert start["first"]["at"] == "2023-11-14T22:13:20.800+00:00"  # the first frame's record time, 4 * 200 ms in


def test_scattered_hits_below_k_in_any_window_never_alert():
    presence = [i % 3 == 0 for i in range(60)]  # at most 2 in any 5
    assert run(presence, AlertRule(k=3, n=5, m=10)) == []


def test_peak_score_and_best_evidence_frame_cover_the_whole_episode():
    scores = {5: 0.4, 6: 0.5, 7: 0.45, 8: 0.9, 9: 0.3}
    presence = [i in scores for i in range(25)]
    _, end = run(presence, AlertRule(k=2, n=3, m=5), score_of=lambda i: scores[i])
    assert end["peak_score"] == 0.9 and end["evidence_frame_id"] == "cam-1:8"


@settings(max_examples=300, deadline=None)
@given(presence=st.lists(st.booleans(), max_size=80), n=st.integers(1, 8), data=st.data())
def test_alerts_match_the_rule_read_literally(presence, n, data):
    k, m = data.draw(st.integers(1, n)), data.draw(st.integers(1, 8))
    assert summary(run(presence, AlertRule(k=k, n=n, m=m))) == reference(presence, k, n, m)


def test_a_redelivered_frame_changes_nothing():
    rule, state = AlertRule(k=2, n=3, m=3), StreamAlerts("cam-1")
    assert state.apply(frame(0, MISSILE), rule) == []
    before = state.to_dict()
    assert state.apply(frame(0, MISSILE), rule) is None
    assert state.to_dict() == before
    assert summary(state.apply(frame(1, MISSILE), rule)) == [("start", 0, 1)]
    assert state.apply(frame(1, MISSILE), rule) is None  # a rewrite of the triggering frame: no second start


def test_a_state_restored_from_its_snapshot_continues_exactly():
    rule = AlertRule(k=2, n=4, m=3)
    presence = [False, True, True, True, False, True, False, False, False, True, True, False]
    whole = StreamAlerts("cam-1")
    expected = [a for i, p in enumerate(presence) for a in whole.apply(frame(i, *([MISSILE] if p else [])), rule)]
    for cut in range(len(presence)):
        state, got = StreamAlerts("cam-1"), []
        for i, p in enumerate(presence):
            if i == cut:
                state = StreamAlerts.from_dict(state.to_dict())
            got += state.apply(frame(i, *([MISSILE] if p else [])), rule)
        assert got == expected


def test_labels_and_checks_are_separate_episodes_and_unwatched_checks_are_ignored():
    rule = AlertRule(k=1, n=1, m=1, checks=frozenset({"forbidden_objects"}))
    state = StreamAlerts("cam-1")
    alerts = state.apply(frame(0, MISSILE, ("forbidden_objects", "rifle", 0.4), ("nsfw", "BUTTOCKS_EXPOSED", 0.9)), rule)
    assert sorted((a["label"], a["event"]) for a in alerts) == [("missile", "start"), ("rifle", "start")]
    assert sorted((a["label"], a["event"]) for a in state.apply(frame(1, MISSILE), rule)) == [("rifle", "end")]


def test_quiet_streams_keep_no_episode_state():
    state = StreamAlerts("cam-1")
    for i in range(50):
        state.apply(frame(i, *([MISSILE] if i == 10 else [])), AlertRule(k=2, n=3, m=3))
    assert state.episodes == {}


def test_a_frame_verdict_is_read_and_a_post_verdict_is_not():
    verdict = {"kind": "frame", "id": "cam-1:7", "stream_id": "cam-1", "frame_index": 7, "pts": 1.4,
               "source": {"topic": "frames", "partition": 2, "offset": 99, "timestamp_ms": 5},
               "violations": [{"check": "forbidden_objects", "label": "missile", "score": 0.3},
                              {"check": "forbidden_objects", "label": "missile", "score": 0.5}]}
    judged = JudgedFrame.from_verdict(verdict)
    assert (judged.partition, judged.offset, judged.violations) == (2, 99, (("forbidden_objects", "missile", 0.5),))
    assert JudgedFrame.from_verdict({"kind": "post", "id": "p-1"}) is None


@pytest.mark.parametrize("spec", [{"k": 4, "n": 3}, {"m": 0}, {"k": "x"}, {"window": 3}, [3, 5, 10]])
def test_a_bad_alerts_section_is_refused_with_its_reason(spec):
    with pytest.raises(PolicyError, match="alerts"):
        Policy.from_dict({"checks": {"o": {"model": "m", "input": "image", "labels": ["x"]}}, "alerts": spec})


def test_alerts_may_name_only_image_checks():
    checks = {"o": {"model": "m", "input": "image", "labels": ["x"]}, "t": {"model": "t", "input": "text", "label": "toxic"}}
    assert Policy.from_dict({"checks": checks, "alerts": {"checks": ["o"]}}).alerts.checks == {"o"}
    with pytest.raises(PolicyError, match="not image checks"):
        Policy.from_dict({"checks": checks, "alerts": {"checks": ["t"]}})



def test_without_an_image_check_the_worker_runs_no_alert_agent(tmp_path):
    """A posts-only policy can raise no alert: no agent reads every verdict back for nothing."""
    from conftest import write_policy

    from streams.app import build_worker_app
    from streams.config import REPO_MODELS, Settings
    from streams.schemas import VERDICTS

    text = {"toxic": {"model": "toxicity", "input": "text", "label": "toxic"}}
    image = {"objects": {"model": "efficientnet-lite0", "input": "image", "labels": ["missile"], "top_k": 3}}
    assert Policy.from_dict({"checks": text}).alerted_checks == []
    for checks, expected in ((text, False), ({**text, **image}, True)):
        settings = Settings(model_dir=str(REPO_MODELS), policy=write_policy(tmp_path / f"{expected}.yaml", checks),
                            data_dir=str(tmp_path / "data"), recommendations="off", intra_op_threads=1)
        topics = {t for agent in build_worker_app(settings).agents.values() for t in agent.channel.topics}
        assert (settings.topic(VERDICTS) in topics) is expected
