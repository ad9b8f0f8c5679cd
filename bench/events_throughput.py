"""Events through the broker with recommendation lists produced: events/s and lists/s of one worker.

N held-out events of the synthetic log (models/recipes/interactions.py) are published first; then a
worker starts and the run is timed from its first consumed event to the last (read from the
worker's /metrics), so the group join is excluded. Writes bench/results/events_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.demo import wait_ready  # noqa: E402
from streams.kafka import ensure_topics  # noqa: E402
from streams.produce import produce_jsonl  # noqa: E402


def counter(port: int, name: str, topic: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'{name}{{topic="{topic}"}}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "events_throughput.json"))
    args = parser.parse_args()
    work = ROOT / ".inferstream" / "bench-events"
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "models" / "recipes"))
    import interactions  # the generator: the same log the models were trained on

    data = interactions.generate()
    files = interactions.write_jsonl(data, work / "log")
    events = work / "events.jsonl"
    with open(files["heldout"]) as src, open(events, "w") as dst:
        for n, line in enumerate(src):
            if n >= args.events:
                break
            dst.write(line)
    port = free_port()
    with EmbeddedBroker(port, log_path=work / "broker.log"):
        settings = Settings.load().replace(broker=f"127.0.0.1:{port}", topic_prefix="bev-", app_id="inferstream-bench-events",
                                           web_port=free_port(), data_dir=str(work / "data"), recommendations="on")
        asyncio.run(ensure_topics(settings))
        sent = produce_jsonl(settings, "events", events).sent
        log = open(work / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], cwd=ROOT,
                                  env={**os.environ, **settings.to_env()}, stdout=log, stderr=log)
        try:
            if not wait_ready(settings.web_port, worker, 120):
                raise SystemExit(f"worker not ready; see {work / 'worker.log'}")
            topic, lists_topic = settings.topic("events"), settings.topic("recommendations")
            while counter(settings.web_port, "inferstream_records_consumed_total", topic) == 0:
                time.sleep(0.05)
            started = time.monotonic()
            while counter(settings.web_port, "inferstream_records_consumed_total", topic) < sent or \
                    counter(settings.web_port, "inferstream_in_flight_records", topic) > 0:
                time.sleep(0.1)
            elapsed = time.monotonic() - started
            lists = counter(settings.web_port, "inferstream_records_produced_total", lists_topic)
        finally:
            worker.terminate()
            worker.wait(30)
    result = {"benchmark": "events_throughput", "events": sent, "seconds": round(elapsed, 2),
              "events_per_s": round(sent / elapsed, 1), "lists": int(lists), "lists_per_s": round(lists / elapsed, 1),
              "users": len({json.loads(x)["user_id"] for x in events.read_text().splitlines()}),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
