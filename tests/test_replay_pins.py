"""`--model NAME@VERSION` pins of a replay (streams/replay_range.py `pinned`, streams/replay.py
`pinned_policy`): a pin replaces the models of its name and nothing else."""

from __future__ import annotations

import pytest

from operators.alerts import AlertRule
from operators.policy import Check, Policy, Redaction
from streams.replay import pinned_policy
from streams.replay_range import ReplayError, pinned

POLICY = Policy(
    checks=(Check("toxic", "toxicity", "text", label="toxic"),
            Check("pii", "pii-ner@1", "text", types=frozenset({"EMAIL"})),
            Check("nsfw", "nudenet-320n", "image", labels=frozenset({"FEMALE_BREAST_EXPOSED"}))),
    source="policy.yaml", redaction=Redaction(frozenset({"EMAIL"})), alerts=AlertRule(k=2, n=4, m=6),
)


def test_a_pin_replaces_the_models_of_its_name_and_nothing_else_of_the_policy():
    replayed = pinned_policy(POLICY, ("toxicity@3", "pii-ner@2"))

    assert [c.model for c in replayed.checks] == ["toxicity@3", "pii-ner@2", "nudenet-320n"]
    assert [c.name for c in replayed.checks] == ["toxic", "pii", "nsfw"]
    assert replayed.checks[1].types == POLICY.checks[1].types
    # what the live path does besides the models is what the replay does
    assert (replayed.redaction, replayed.alerts, replayed.source) == (POLICY.redaction, POLICY.alerts, POLICY.source)


def test_without_pins_the_policy_is_unchanged():
    assert pinned_policy(POLICY, ()) == POLICY


@pytest.mark.parametrize("pin", ["toxicity", "toxicity@", ""])
def test_a_pin_without_a_version_is_refused(pin):
    with pytest.raises(ReplayError, match="expected NAME@VERSION"):
        pinned_policy(POLICY, (pin,))


def test_a_pin_that_no_model_uses_is_refused_by_name():
    with pytest.raises(ReplayError, match="toxicty: no check of the policy uses that model"):
        pinned_policy(POLICY, ("toxicty@3",))


def test_events_replays_pin_the_retrieval_and_ranking_models():
    refs = pinned(["cf-retrieval", "deepfm-ctr"], ["deepfm-ctr@2"], "events replays use the retrieval and ranking models only")

    assert refs == {"cf-retrieval": "cf-retrieval", "deepfm-ctr": "deepfm-ctr@2"}
    with pytest.raises(ReplayError, match="toxicity: events replays use"):
        pinned(["cf-retrieval", "deepfm-ctr"], ["toxicity@1"], "events replays use the retrieval and ranking models only")
