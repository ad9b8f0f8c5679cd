"""`make run` / `inferstream demo`: embedded broker + worker + a sample video, verdicts printed live."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np

from operators.video import sample_frames, write_video
from streams.broker import EmbeddedBroker, free_port
from streams.config import Settings
from streams.kafka import consumer, ensure_topics
from streams.produce import produce_jsonl, produce_video
from streams.schemas import ALERTS, DEAD_LETTERS, RECOMMENDATIONS, VERDICTS

WORK = Path(".inferstream")
SAMPLE_POSTS = Path(__file__).resolve().parent.parent / "samples" / "posts.jsonl"
SAMPLE_EVENTS = Path(__file__).resolve().parent.parent / "samples" / "events.jsonl"


def sample_video(path: Path, seconds: float = 6.0, fps: int = 10, size: tuple[int, int] = (640, 480)) -> Path:
    """A slide show of scikit-image's sample photos with a slow zoom, generated (not downloaded)."""
    from skimage import data

    # the rocket (judged a missile) before the last photo: its alert both starts and ends on screen
    photos = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut()]
    per_photo = max(1, int(seconds * fps / len(photos)))
    w, h = size

    def frames():
        for photo in photos:
            for i in range(per_photo):
                zoom = 1.0 + 0.15 * i / per_photo
                ph, pw = photo.shape[:2]
                ch, cw = int(ph / zoom), int(pw / zoom)
                top, left = (ph - ch) // 2, (pw - cw) // 2
                crop = photo[top : top + ch, left : left + cw]
                yield np.ascontiguousarray(cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA))

    return write_video(path, frames(), fps=fps)


def _recommendation_line(rec: dict) -> str:
    items = " ".join(i["item_id"] for i in rec["items"][:8])
    return f"recs  {rec['user_id']:<14} {rec['source']:<7} {items}  ({rec['reason']}, {rec['based_on_events']} events)"


def _alert_line(alert: dict) -> str:
    first, last = alert["first"]["frame_index"], alert["last"]["frame_index"]
    return (f"ALERT {alert['event']:<5} {alert['stream_id']} {alert['check']}:{alert['label']}  frames {first}-{last}, "
            f"peak {alert['peak_score']:.2f} at {alert['evidence_frame_id']}")


def _line(verdict: dict) -> str:
    """One readable line per verdict: what was judged, safe or not and why, the evidence."""
    status = "safe  " if verdict["safe"] else "UNSAFE"
    why = ", ".join(f"{v['check']}:{v.get('label') or ','.join(v.get('types', []))} {v['score']:.2f}"
                    for v in verdict["violations"])
    evidence = []
    if verdict.get("classifications"):
        evidence.append(", ".join(f"{c['label']} {c['score']:.2f}" for c in verdict["classifications"][:3]))
    if verdict.get("entities"):
        evidence.append("entities " + ", ".join(f"{e['type']}={e['text']!r}" for e in verdict["entities"]))
    for name, scores in verdict.get("scores", {}).items():
        evidence.append(f"{name} " + " ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    if verdict.get("detections"):
        evidence.append("detected " + ", ".join(f"{d['label']} {d['score']:.2f}" for d in verdict["detections"]))
    what = f"frame {verdict['id']}" if verdict["kind"] == "frame" else f"post  {verdict['id']}"
    e2e = verdict["latency_ms"]["end_to_end"]
    return f"{what:<20} {status} {why:<40} | {' | '.join(evidence)}  ({e2e} ms)"


def sample_posts(path: Path) -> Path:
    """The repository's sample posts plus two with inline photos (one shows a rocket: 'missile')."""
    import base64

    from skimage import data

    from operators.images import encode_image

    lines = SAMPLE_POSTS.read_text().splitlines()
    for pid, photo in (("p-2001", data.coffee()), ("p-2002", data.rocket())):
        small = cv2.resize(photo, (320, int(320 * photo.shape[0] / photo.shape[1])), interpolation=cv2.INTER_AREA)
        image = {"encoding": "jpeg", "data": base64.b64encode(encode_image(small, "jpeg")).decode()}
        lines.append(json.dumps({"id": pid, "user_id": "u-90", "text": "look at this!", "image": image,
                                 "created_at": "2026-11-25T11:00:00Z"}))
    path.write_text("\n".join(lines) + "\n")
    return path


async def _print_results(settings: Settings, expected: int, timeout_s: float, then_forever: bool = False) -> int:
    """Print verdicts, dead letters and lists until `expected` arrived or the timeout (stream alerts print
    as they come, uncounted); with `then_forever`, keep printing new ones until Ctrl-C."""
    kafka = consumer(settings, settings.topic(VERDICTS), settings.topic(DEAD_LETTERS), settings.topic(RECOMMENDATIONS),
                     settings.topic(ALERTS), group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await kafka.start()
    seen = 0
    announced = False
    deadline = time.monotonic() + timeout_s
    try:
        while then_forever or (seen < expected and time.monotonic() < deadline):
            if then_forever and seen >= expected and not announced:
                announced = True
                print(f"demo: {seen}/{expected} sample frames, posts and recommendation lists; broker and worker keep running "
                      f"(publish more: INFERSTREAM_BROKER={settings.broker} INFERSTREAM_TOPIC_PREFIX={settings.topic_prefix} "
                      "inferstream produce video FILE --stream-id ID). Ctrl-C stops everything.", flush=True)
            batch = await kafka.getmany(timeout_ms=500)
            for messages in batch.values():
                for msg in messages:
                    record = json.loads(msg.value)
                    if msg.topic == settings.topic(ALERTS):
                        print(_alert_line(record), flush=True)
                        continue
                    if msg.topic.endswith(DEAD_LETTERS):
                        print(f"dead letter {record['reason']}: {record['detail']}", flush=True)
                    elif msg.topic.endswith(RECOMMENDATIONS):
                        print(_recommendation_line(record), flush=True)
                    else:
                        print(_line(record), flush=True)
                    seen += 1
    finally:
        await kafka.stop()
    return seen


def expected_lists(path: Path, settings: Settings) -> int:
    """Users whose sample events ask for a list: a trigger kind, or at least rec_every_n_events events."""
    kinds = {k.strip() for k in settings.rec_on_kinds.split(",")}
    per_user: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            event = json.loads(line)
            per_user.setdefault(event["user_id"], []).append(event["kind"])
    return sum(1 for ks in per_user.values() if set(ks) & kinds or len(ks) >= settings.rec_every_n_events)


def wait_ready(web_port: int, worker: subprocess.Popen, timeout_s: float) -> bool:
    """Poll the worker's /ready endpoint until it answers 200 (or the worker dies, or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while joining the group
        time.sleep(0.5)
    return False


def run_demo(port: int = 9092, seconds: float = 6.0, keep_running: bool = False) -> int:
    WORK.mkdir(exist_ok=True)
    settings = Settings.load().replace(broker=f"127.0.0.1:{port}", topic_prefix="demo-", app_id="inferstream-demo")
    print(f"demo: starting the embedded broker on 127.0.0.1:{port}", flush=True)
    worker = None
    with EmbeddedBroker(port, log_path=WORK / "broker.log"):
        try:
            asyncio.run(ensure_topics(settings))
            web_port = free_port()
            env = {**os.environ, "INFERSTREAM_BROKER": settings.broker, "INFERSTREAM_TOPIC_PREFIX": settings.topic_prefix,
                   "INFERSTREAM_APP_ID": settings.app_id, "INFERSTREAM_WEB_PORT": str(web_port)}
            log = open(WORK / "worker.log", "ab")  # noqa: SIM115
            # own session: Ctrl-C reaches only the demo, which stops the worker before the broker
            worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env, stdout=log, stderr=log,
                                      start_new_session=True)
            print(f"demo: worker starting (log: {WORK / 'worker.log'}); metrics at http://127.0.0.1:{web_port}/metrics, "
                  f"readiness at http://127.0.0.1:{web_port}/ready", flush=True)
            video = sample_video(WORK / "sample.mp4", seconds)
            if not wait_ready(web_port, worker, timeout_s=90):
                print(f"demo: the worker did not become ready; see {WORK / 'worker.log'}", flush=True)
                return 1
            print(f"demo: worker ready; playing {video} into {settings.topic('frames')} as a live camera", flush=True)
            posts = sample_posts(WORK / "posts.jsonl")
            report = produce_jsonl(settings, "posts", posts)
            print(f"demo: published {report.sent} sample posts from {SAMPLE_POSTS.name} (+2 with photos)", flush=True)
            events = produce_jsonl(settings, "events", SAMPLE_EVENTS)
            users = expected_lists(SAMPLE_EVENTS, settings)
            print(f"demo: published {events.sent} sample events from {SAMPLE_EVENTS.name} ({users} users get a list)", flush=True)
            expected = sum(1 for _ in sample_frames(video)) + report.sent + users
            # publish in the background (paced like a camera) while verdicts print as they arrive
            producer = threading.Thread(target=produce_video, args=(settings, video, "demo-cam"),
                                        kwargs={"realtime": 1.0}, daemon=True)
            producer.start()
            seen = asyncio.run(_print_results(settings, expected, timeout_s=120, then_forever=keep_running))
            producer.join(10)
            print(f"demo: {seen}/{expected} frames and posts judged", flush=True)
            return 0 if seen >= expected else 1
        except KeyboardInterrupt:  # the normal way to end `make run`
            print("\ndemo: stopping the worker, then the broker", flush=True)
            return 0 if keep_running else 130
        finally:
            if worker is not None and worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(20)
                except subprocess.TimeoutExpired:
                    worker.kill()
