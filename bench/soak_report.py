"""The soak's report (figures from the ledger and the /proc samples) and its picture."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

WARM_UP_S = 120  # a worker's first two minutes (model loads, arenas, caches) are not growth
MB = 1024 * 1024


def growth(samples: list[dict], load_end_s: float) -> list[dict[str, Any]]:
    """Per worker process that lived through load for at least 3 minutes after its warm-up: RSS and
    open fds in the minute after warm-up vs the last minute of load, and the growth between them."""
    by_pid: dict[int, list[tuple[float, str, int, int, dict | None]]] = defaultdict(list)
    for row in samples:
        for slot, s in row.items():
            if isinstance(s, dict) and s.get("rss"):
                by_pid[s["pid"]].append((row["t_s"], slot, s["rss"], s["fds"], s.get("resident")))
    out = []
    for pid, rows in by_pid.items():
        born = rows[0][0]
        base = [r for r in rows if born + WARM_UP_S <= r[0] < born + WARM_UP_S + 60]
        last = [r for r in rows if r[0] <= load_end_s][-12:]
        if not base or not last or last[-1][0] - base[0][0] < 180:
            continue
        rss0, rss1 = np.mean([r[2] for r in base]), np.mean([r[2] for r in last])
        fd0, fd1 = np.mean([r[3] for r in base]), np.mean([r[3] for r in last])
        # a leak keeps climbing; a working set that steps up when a fault hands this worker more work
        # (a takeover, a second model version) and then stays flat does not: also the second half alone
        mid_t = (base[0][0] + last[-1][0]) / 2
        mid = [r for r in rows if mid_t <= r[0] < mid_t + 60]
        rss_mid = np.mean([r[2] for r in mid]) if mid else rss0
        out.append({"slot": rows[0][1], "pid": pid, "from_s": base[0][0], "to_s": last[-1][0],
                    "rss_mb_half_way": round(rss_mid / MB, 1), "rss_growth_second_half": round(rss1 / rss_mid - 1, 4),
                    "rss_mb_after_warm_up": round(rss0 / MB, 1), "rss_mb_at_end": round(rss1 / MB, 1),
                    "rss_growth": round(rss1 / rss0 - 1, 4), "fds_after_warm_up": round(fd0, 1),
                    "fds_at_end": round(fd1, 1), "fds_growth": round(fd1 / fd0 - 1, 4),
                    "resident_mb_after_warm_up": _resident_mb(base), "resident_mb_half_way": _resident_mb(mid),
                    "resident_mb_at_end": _resident_mb(last)})
    return sorted(out, key=lambda g: g["from_s"])


def cpu_per_minute(samples: list[dict]) -> dict[str, list[float | None]]:
    """Cores used in each minute of the run by the broker, this soak process and each worker slot
    (summed over the slot's processes; the interval across a restart counts the new process's
    seconds only): who took the machine's cores as latency moved."""
    def cores(series: list[tuple[float, int | None, float | None]]) -> list[float | None]:
        used: dict[int, float] = defaultdict(float)
        for (t0, pid0, c0), (_, pid1, c1) in zip(series, series[1:], strict=False):
            if c1 is None:
                continue
            used[int(t0 // 60)] += c1 - c0 if pid1 == pid0 and c0 is not None else c1 if pid1 != pid0 else 0.0
        return [round(used[m] / 60, 3) if m in used else None for m in range(max(used, default=-1) + 1)]

    out = {"broker": cores([(r["t_s"], 0, r.get("broker_cpu_s")) for r in samples]),
           "soak": cores([(r["t_s"], 0, r.get("soak_cpu_s")) for r in samples])}
    for slot in sorted({k for r in samples for k, v in r.items() if isinstance(v, dict) and "pid" in v}):
        out[f"worker {slot}"] = cores([(r["t_s"], r[slot]["pid"], r[slot].get("cpu_s")) for r in samples
                                       if isinstance(r.get(slot), dict)])
    return out


def _resident_mb(rows: list[tuple]) -> dict[str, float] | None:
    """The mean of the rows' resident-by-kind readings (bench/harness.py), in MiB."""
    readings = [r[4] for r in rows if r[4]]
    if not readings:
        return None
    return {kind: round(float(np.mean([r[kind] for r in readings])) / MB, 1) for kind in readings[0]}


def summary(run, samples: list[dict], expected_reasons: dict[str, str]) -> dict[str, Any]:
    ledger = run.ledger
    books = ledger.books()
    lost = sum(k["lost"] for k in books.values())
    # a rewrite is fine when identical, or identical but for the model version: a record judged just
    # before the hot swap (same weights under a new version number) whose commit a kill then lost
    non_identical = sum(n for what, n in ledger.duplicates.items() if what.endswith(" differ"))
    poison: dict[str, Any] = {}
    for (variant, reason), n in sorted(ledger.poison_reasons.items()):
        entry = poison.setdefault(variant, {"expected": expected_reasons.get(variant), "got": {}})
        entry["got"][reason] = n
    unexpected = {v: e for v, e in poison.items() if set(e["got"]) != {e["expected"]}}
    load_end = next((e["t_s"] for e in run.events if e["what"] == "producers done"), samples[-1]["t_s"] if samples else 0)
    memory = growth(samples, load_end)
    swapped = Counter()
    for (check, model, minute), n in ledger.versions.items():
        if check == "forbidden_objects":
            swapped[f"{model} minute {minute}"] += n
    exit_status = 1 if lost else 2 if non_identical else 0
    return {
        "verdict": {"lost": lost, "inputs": sum(k["inputs"] for k in books.values()),
                    "duplicates": dict(ledger.duplicates), "non_identical_rewrites": non_identical,
                    "wrong_ids": len(ledger.wrong_ids), "poison_with_unexpected_reason": sorted(unexpected),
                    "worst_rss_growth_after_warm_up": max((g["rss_growth"] for g in memory), default=None),
                    "worst_rss_growth_second_half": max((g["rss_growth_second_half"] for g in memory), default=None),
                    "worst_fds_growth_after_warm_up": max((g["fds_growth"] for g in memory), default=None),
                    "exit_status": exit_status},
        "books": books,
        "send_failed": dict(ledger.send_failed),
        "dead_letters_by_reason": {f"{k}: {r}": n for (k, r), n in sorted(ledger.dead_reasons.items())},
        "poison": poison,
        "good_inputs_dead_lettered": ledger.good_dead_lettered,
        "differing_rewrites": ledger.differing,
        "wrong_id_examples": ledger.wrong_ids[:20],
        "recommendation_lists": dict(ledger.lists),
        "hot_swap_versions_per_minute": dict(sorted(swapped.items())),
        "latency_per_minute": ledger.latency_per_minute(),
        "per_minute": {"sent": {f"{k} {m}": n for (k, m), n in sorted(ledger.sent_per_minute.items())},
                       "answered": {f"{k} {m}": n for (k, m), n in sorted(ledger.done_per_minute.items())}},
        "memory": memory,
        "cpu_cores_per_minute": cpu_per_minute(samples),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 2, figsize=(13, 11))
    kinds = sorted(report["books"])
    colors = dict(zip(kinds, ("tab:blue", "tab:orange", "tab:green"), strict=False))

    def per_minute(table: dict[str, int], kind: str) -> tuple[list[int], list[int]]:
        rows = sorted((int(key.split()[1]), n) for key, n in table.items() if key.split()[0] == kind)
        return [m for m, _ in rows], [n for _, n in rows]

    for kind in kinds:
        m, n = per_minute(report["per_minute"]["sent"], kind)
        ax[0, 0].plot(m, np.array(n) / 60, "-", color=colors[kind], label=f"{kind} in")
        m, n = per_minute(report["per_minute"]["answered"], kind)
        ax[0, 0].plot(m, np.array(n) / 60, "--", color=colors[kind], label=f"{kind} answered")
        rows = [r for r in report["latency_per_minute"] if r["kind"] == kind]
        if rows:
            ax[0, 1].plot([r["minute"] for r in rows], [r["p50_ms"] for r in rows], "-", color=colors[kind], label=f"{kind} p50")
            ax[0, 1].plot([r["minute"] for r in rows], [r["p99_ms"] for r in rows], ":", color=colors[kind], label=f"{kind} p99")
    ax[0, 0].set_ylabel("records/s (per minute)")
    ax[0, 1].set_ylabel("end-to-end latency (ms)")
    ax[0, 1].set_yscale("log")
    for a in ax[0]:
        a.set_xlabel("minute")
    samples = report["samples"]
    pids: dict[int, str] = {}
    for row in samples:
        for slot, s in row.items():
            if isinstance(s, dict):
                pids.setdefault(s["pid"], slot)
    slot_colors = {"A": "tab:purple", "B": "tab:brown"}
    labelled: set[str] = set()
    for pid, slot in pids.items():
        pts = [(row["t_s"] / 60, row[slot]["rss"] / MB, row[slot]["fds"]) for row in samples
               if isinstance(row.get(slot), dict) and row[slot]["pid"] == pid and row[slot]["rss"]]
        if pts:
            t, rss, fds = zip(*pts, strict=True)
            label = None if slot in labelled else f"worker {slot}"
            labelled.add(slot)
            ax[1, 0].plot(t, rss, color=slot_colors.get(slot, "grey"), label=label)
            ax[1, 1].plot(t, fds, color=slot_colors.get(slot, "grey"))
    ax[1, 0].set_ylabel("worker RSS (MiB)")
    ax[1, 1].set_ylabel("worker open fds")
    t = [row["t_s"] / 60 for row in samples]
    ax[2, 0].plot(t, [(row["broker_rss"] or 0) / MB for row in samples], color="black", label="broker RSS (MiB)")
    twin = ax[2, 0].twinx()
    twin.plot(t, [row["load_average"][0] for row in samples], color="tab:red", linewidth=0.8, label="load average (1 min)")
    cpu_colors = {"broker": "black", "worker A": "tab:purple", "worker B": "tab:brown"}
    for who, per_minute_cores in report.get("cpu_cores_per_minute", {}).items():
        if who in cpu_colors:
            twin.plot([m + 0.5 for m in range(len(per_minute_cores))], per_minute_cores, "--", color=cpu_colors[who],
                      label=f"{who} CPU (cores)")
    twin.set_ylabel("load average; CPU (cores, per minute)", color="tab:red")
    twin.legend(fontsize=7, loc="upper right")
    ax[2, 0].set_ylabel("broker RSS (MiB)")
    reasons = report["dead_letters_by_reason"]
    ax[2, 1].barh(list(reasons), list(reasons.values()), color="tab:grey")
    ax[2, 1].set_xlabel("dead letters")
    ax[2, 1].tick_params(axis="y", labelsize=7)
    for a in (ax[1, 0], ax[1, 1], ax[2, 0]):
        a.set_xlabel("minute")
    for e in report["timeline"]:
        style = {"kill -9": ("tab:red", ":"), "broker SIGSTOP": ("black", "--"), "hot swap": ("tab:green", "-."),
                 "exited": ("tab:orange", ":")}.get(e["what"])
        if style:
            for a in (ax[0, 0], ax[0, 1], ax[1, 0], ax[1, 1], ax[2, 0]):
                a.axvline(e["t_s"] / 60, color=style[0], linestyle=style[1], linewidth=0.8)
    for a in (ax[0, 0], ax[0, 1], ax[1, 0]):
        a.legend(fontsize=7, loc="upper left")
    v = report["verdict"]
    fig.suptitle(f"Soak: {report['args']['minutes']:g} min, {v['inputs']:,} inputs, {v['lost']} lost, "
                 f"{sum(v['duplicates'].values()):,} duplicates ({v['non_identical_rewrites']} not identical); "
                 "red: kill -9, black: broker frozen, green: hot swap")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
