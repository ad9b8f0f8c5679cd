"""A worker of two agents reading through `batches_of` (streams/batches.py), for
tests/test_integration_batching.py. Run as a child process: `python tests/two_agents_app.py`.

- `slow` (topic TWO_AGENTS_SLOW) takes its first batch and then waits until the file TWO_AGENTS_GATE
  exists, as an agent stuck behind a slow model would;
- `fast` (topic TWO_AGENTS_FAST) forwards each batch at once.

Each forwards every record to `<topic>-out`, keyed `partition:offset`, and acks it after delivery.
Fetches are small (20 records) so that `slow`'s queue fills after a few of them, and Faust's livelock
check reports a partition whose agent took nothing for 5 s."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faust  # noqa: E402

from streams import diagnostics  # noqa: E402
from streams.app import create_app  # noqa: E402
from streams.batches import batches_of  # noqa: E402
from streams.config import Settings  # noqa: E402


def add_agent(app: faust.App, topic: str, gate: Path | None) -> None:
    @app.agent(app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"),
               name=topic)
    async def forward(stream):
        async for batch in batches_of(app, [topic]):
            while gate is not None and not gate.exists():
                await asyncio.sleep(0.05)  # stuck, as behind a slow model
            sent = [await app.producer.send(f"{topic}-out", f"{m.tp.partition}:{m.offset}".encode(), m.value, None, None, None)
                    for m in batch]
            await asyncio.gather(*sent)
            for m in batch:
                m.ack(app.consumer)


def main() -> None:
    settings = Settings.load()
    app = create_app(settings)
    app.conf.broker_max_poll_records = 20
    app.conf.stream_processing_timeout = 5  # Faust's livelock check reports a stuck agent after this
    diagnostics.install(app)  # GET /debug/state: what it waits on, when a test fails
    add_agent(app, os.environ["TWO_AGENTS_SLOW"], Path(os.environ["TWO_AGENTS_GATE"]))
    add_agent(app, os.environ["TWO_AGENTS_FAST"], None)
    faust.Worker(app, loglevel="INFO", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
