"""Version-diff report of a replay: its verdicts against a baseline (the live verdicts, or another
replay's), record by record, matched by verdict id."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from contextlib import aclosing
from typing import Any

from streams.config import Settings
from streams.kafka import read_to_high_watermark
from streams.schemas import RECOMMENDATIONS, VERDICTS


async def read_verdicts(settings: Settings, topic: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every verdict (or list) on `topic` up to its high watermark now (no consumer group)."""
    async with aclosing(read_to_high_watermark(settings, topic, timeout_s=timeout_s)) as records:
        return [json.loads(r.value) async for r in records]


async def replay_report(settings: Settings, summary: dict[str, Any], compare_topic: str | None,
                        lists: bool) -> tuple[dict[str, Any], str]:
    """The version-diff report of a finished replay (`summary`) and its text: the replay's own records
    on its output topic against the baseline (`compare_topic`, else the live topic's own records);
    `lists`: recommendation lists rather than verdicts."""
    baseline_topic = compare_topic or settings.topic(RECOMMENDATIONS if lists else VERDICTS)
    mine = [v for v in await read_verdicts(settings, summary["output"]) if v.get("replay", {}).get("run") == summary["run"]]
    base = [v for v in await read_verdicts(settings, baseline_topic)
            if compare_topic or "replay" not in v]  # the live topic's own records only
    diff = compare_lists(mine, base, k=settings.rec_k) if lists else compare(mine, base)
    report = {"replay": summary, "baseline_topic": baseline_topic, **diff}
    return report, (format_list_report if lists else format_report)(report)


def _violation_scores(verdict: dict[str, Any]) -> dict[str, float]:
    best: dict[str, float] = {}
    for v in verdict.get("violations", []):
        best[v["check"]] = max(best.get(v["check"], 0.0), v["score"])
    return best


def _entities(verdict: dict[str, Any]) -> set[tuple[str, int, int]]:
    return {(e["type"], e["start"], e["end"]) for e in verdict.get("entities", [])}


def compare(replayed: list[dict[str, Any]], baseline: list[dict[str, Any]], top: int = 20) -> dict[str, Any]:
    """Agreement, flips per check, score deltas and entity differences between two verdict sets."""
    base = {v["id"]: v for v in baseline}  # later verdicts for the same id win (redeliveries)
    mine = {v["id"]: v for v in replayed}
    compared = [i for i in mine if i in base]
    flips = Counter()
    by_check: dict[str, dict[str, Any]] = defaultdict(lambda: {"added": 0, "removed": 0, "deltas": []})
    label_deltas: dict[str, list[float]] = defaultdict(list)
    entity_added, entity_removed, entity_records = Counter(), Counter(), 0
    disagreements = []
    for i in compared:
        new, old = mine[i], base[i]
        if old["safe"] and not new["safe"]:
            flips["safe_to_unsafe"] += 1
        elif new["safe"] and not old["safe"]:
            flips["unsafe_to_safe"] += 1
        new_v, old_v = _violation_scores(new), _violation_scores(old)
        for check in set(new_v) | set(old_v):
            stats = by_check[check]
            stats["added"] += check in new_v and check not in old_v
            stats["removed"] += check in old_v and check not in new_v
            stats["deltas"].append(abs(new_v.get(check, 0.0) - old_v.get(check, 0.0)))
        deltas = []
        for check, scores in new.get("scores", {}).items():
            for label, score in scores.items():
                delta = abs(score - old.get("scores", {}).get(check, {}).get(label, 0.0))
                label_deltas[f"{check}:{label}"].append(delta)
                deltas.append(delta)
        new_e, old_e = _entities(new), _entities(old)
        if new_e != old_e:
            entity_records += 1
            entity_added.update(t for t, _, _ in new_e - old_e)
            entity_removed.update(t for t, _, _ in old_e - new_e)
        changed = sorted(set(new_v) ^ set(old_v))
        largest = max(deltas + [abs(new_v.get(c, 0.0) - old_v.get(c, 0.0)) for c in set(new_v) | set(old_v)], default=0.0)
        if new["safe"] != old["safe"] or changed or largest > 0:
            disagreements.append({"id": i, "baseline_safe": old["safe"], "replay_safe": new["safe"],
                                  "checks_changed": changed, "max_score_delta": round(largest, 6)})
    disagreements.sort(key=lambda d: (d["baseline_safe"] == d["replay_safe"], -d["max_score_delta"], d["id"]))
    agree = sum(mine[i]["safe"] == base[i]["safe"] for i in compared)

    def summary(values: list[float]) -> dict[str, float]:
        return {"mean_abs": round(sum(values) / len(values), 6), "max_abs": round(max(values), 6)} if values else {}

    return {
        "replayed": len(mine), "compared": len(compared), "missing_in_baseline": len(mine) - len(compared),
        "agreement": round(agree / len(compared), 6) if compared else None,
        "flips": {"safe_to_unsafe": flips["safe_to_unsafe"], "unsafe_to_safe": flips["unsafe_to_safe"]},
        # violation_score_delta compares each check's strongest violation (0 when none): a threshold
        # change moves it even when the model's scores (score_deltas) are identical
        "by_check": {c: {"violations_added": s["added"], "violations_removed": s["removed"],
                         "violation_score_delta": summary(s["deltas"])} for c, s in sorted(by_check.items())},
        "score_deltas": {k: summary(v) for k, v in sorted(label_deltas.items())},
        "entities": {"records_differing": entity_records, "added": dict(entity_added), "removed": dict(entity_removed)},
        "top_disagreements": disagreements[:top],
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"compared {report['compared']} of {report['replayed']} replayed verdicts "
             f"({report['missing_in_baseline']} had no baseline)"]
    if report["agreement"] is not None:
        lines.append(f"agreement on safe/unsafe: {report['agreement']:.1%}")
    f = report["flips"]
    lines.append(f"flips: safe -> unsafe {f['safe_to_unsafe']}, unsafe -> safe {f['unsafe_to_safe']}")
    for check, s in report["by_check"].items():
        delta = s["violation_score_delta"]
        lines.append(f"  {check}: +{s['violations_added']} / -{s['violations_removed']} violations"
                     + (f", violation score delta mean {delta['mean_abs']:.4f} max {delta['max_abs']:.4f}" if delta else ""))
    for label, delta in report["score_deltas"].items():
        lines.append(f"  model score {label}: delta mean {delta['mean_abs']:.4f} max {delta['max_abs']:.4f}")
    e = report["entities"]
    if e["records_differing"]:
        lines.append(f"entities differ on {e['records_differing']} records (added {e['added']}, removed {e['removed']})")
    for d in report["top_disagreements"][:10]:
        lines.append(f"  {d['id']}: {'safe' if d['baseline_safe'] else 'UNSAFE'} -> {'safe' if d['replay_safe'] else 'UNSAFE'}"
                     f" {' '.join(d['checks_changed'])} (max delta {d['max_score_delta']:.4f})")
    return "\n".join(lines)


def compare_lists(replayed: list[dict[str, Any]], baseline: list[dict[str, Any]], k: int = 10, top: int = 20) -> dict[str, Any]:
    """Recommendation lists against a baseline, per user: overlap@K (shared items / K) and Kendall's
    tau between the two rankings of the shared items."""
    from scipy.stats import kendalltau

    base = {v["user_id"]: v for v in baseline}  # the latest list per user wins
    mine = {v["user_id"]: v for v in replayed}
    compared = [u for u in mine if u in base]
    overlaps, taus, rows = [], [], []
    for user in compared:
        new = [i["item_id"] for i in mine[user]["items"][:k]]
        old = [i["item_id"] for i in base[user]["items"][:k]]
        shared = [item for item in new if item in old]
        overlap = len(shared) / k
        tau = None
        if len(shared) >= 2:
            tau = float(kendalltau([new.index(i) for i in shared], [old.index(i) for i in shared]).statistic)
            taus.append(tau)
        overlaps.append(overlap)
        rows.append({"user_id": user, f"overlap@{k}": round(overlap, 4), "kendall_tau": None if tau is None else round(tau, 4)})
    rows.sort(key=lambda r: (r[f"overlap@{k}"], r["kendall_tau"] if r["kendall_tau"] is not None else -2, r["user_id"]))
    mean = lambda xs: round(sum(xs) / len(xs), 6) if xs else None  # noqa: E731
    return {"replayed": len(mine), "compared": len(compared), "missing_in_baseline": len(mine) - len(compared),
            f"mean_overlap@{k}": mean(overlaps), "mean_kendall_tau": mean(taus),
            "identical_lists": sum(1 for u in compared if [i["item_id"] for i in mine[u]["items"][:k]]
                                   == [i["item_id"] for i in base[u]["items"][:k]]),
            "least_similar": rows[:top]}


def format_list_report(report: dict[str, Any]) -> str:
    key = next(k for k in report if k.startswith("mean_overlap@"))
    lines = [f"compared {report['compared']} of {report['replayed']} replayed lists ({report['missing_in_baseline']} had no baseline)",
             f"{key.replace('mean_', 'mean ')}: {report[key]}, mean Kendall tau: {report['mean_kendall_tau']}, "
             f"identical: {report['identical_lists']}"]
    lines += [f"  {r['user_id']}: {r}" for r in report["least_similar"][:5]]
    return "\n".join(lines)
