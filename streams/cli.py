"""`inferstream` command line. Every command reads Settings from INFERSTREAM_* variables (and an
optional --config file); flags override them."""

from __future__ import annotations

import asyncio
import json
import logging.config
import signal
import sys

import click

from streams.config import Settings


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj["settings"]


class _Group(click.Group):
    """Turns expected failures (broker down, bad file, port taken) into one line, not a traceback."""

    def invoke(self, ctx: click.Context):
        from streams.broker import BrokerError
        from streams.produce import ProduceError

        try:
            return super().invoke(ctx)
        except (BrokerError, ProduceError, FileNotFoundError, ValueError) as exc:
            click.echo(f"inferstream: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)


@click.group(cls=_Group)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="INFERSTREAM_CONFIG",
              help="YAML settings file (environment variables INFERSTREAM_* override it).")
@click.option("--broker", help="Kafka bootstrap servers (default from INFERSTREAM_BROKER, else 127.0.0.1:9092).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, broker: str | None) -> None:
    """inferstream: Kafka-native streaming inference."""
    settings = Settings.load(config_path)
    if broker:
        settings = settings.replace(broker=broker)
    ctx.obj = {"settings": settings}


@main.command()
@click.option("--port", default=9092, show_default=True, help="Port on 127.0.0.1.")
def broker(port: int) -> None:
    """Run the embedded Kafka-protocol broker (tansu) until Ctrl-C."""
    from streams.broker import EmbeddedBroker

    with EmbeddedBroker(port) as b:
        click.echo(f"broker ready on {b.bootstrap} (in memory: everything is lost when it stops)", err=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            b.process.wait()
        except KeyboardInterrupt:
            pass
    click.echo("broker stopped", err=True)


@main.command()
@click.option("--web-port", type=int, help="HTTP port of this worker (default INFERSTREAM_WEB_PORT, 6066).")
@click.pass_context
def worker(ctx: click.Context, web_port: int | None) -> None:
    """Run a worker with all agents; workers with the same app id share the partitions."""
    import faust

    from streams.app import build_worker_app
    from streams.broker import wait_for_metadata
    from streams.kafka import ensure_topics

    settings = _settings(ctx)
    if web_port:
        settings = settings.replace(web_port=web_port)
    asyncio.run(wait_for_metadata(settings.broker, 30, settings.kafka_client_options()))
    asyncio.run(ensure_topics(settings))
    from streams.logs import logging_config

    app = build_worker_app(settings)
    faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True,
                 logging_config=logging_config(settings.log_level, settings.log_format)).execute_from_commandline()


@main.command("serve-grpc")
@click.option("--port", type=int, help="Port on web_host (default INFERSTREAM_GRPC_PORT, else 50051; 0: any free port).")
@click.pass_context
def serve_grpc(ctx: click.Context, port: int | None) -> None:
    """Serve gRPC Predict/BatchPredict and health for every model of the repository, without Kafka.

    Models load on their first request and follow serving.yaml (pins, splits) and new versions."""
    from operators.model_repository import ModelRepository
    from operators.registry import ModelRegistry
    from streams.grpc_server import GrpcServer
    from streams.logs import logging_config

    settings = _settings(ctx)
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))
    port = port if port is not None else (settings.grpc_port or 50051)
    providers = settings.provider_list
    registry = ModelRegistry(ModelRepository(settings.model_dir), providers, settings.intra_op_threads or None)

    async def serve() -> None:
        server = GrpcServer(registry, settings.web_host, port, settings=settings)  # --config's limits too
        await server.start()
        click.echo(json.dumps({"grpc": f"{settings.web_host}:{server.port}", "model_dir": settings.model_dir}), err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.ensure_future(registry.watch())
        try:
            await stop.wait()
        finally:
            watcher.cancel()
            await server.stop()
            await registry.close()

    asyncio.run(serve())


@main.group()
def produce() -> None:
    """Publish frames, posts or events."""


@produce.command("video")
@click.argument("source")
@click.option("--stream-id", required=True, help="Key of every frame (one stream = one partition, in order).")
@click.option("--fps", type=float, help="Sample about N frames per second of video.")
@click.option("--every", type=int, help="Sample every Nth frame.")
@click.option("--encoding", type=click.Choice(["jpeg", "png", "raw"]), default="jpeg", show_default=True)
@click.option("--max-frames", type=int, help="Stop after N frames.")
@click.option("--skip-oversized", is_flag=True, help="Report and skip frames over the message limit instead of stopping.")
@click.option("--realtime", type=float, default=None, is_flag=False, flag_value=1.0,
              help="Pace a file's frames by their timestamps like a live camera (optional speed factor, default 1.0).")
@click.option("--max-side", type=int, help="Scale frames down so the longer side is at most N pixels.")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=90, show_default=True)
@click.option("--rtsp-transport", type=click.Choice(["tcp", "udp", "udp_multicast", "http", "https"]), default="tcp",
              show_default=True, help="RTSP lower transport.")
@click.option("--open-timeout", type=float, default=10.0, show_default=True, help="Live sources: seconds to connect.")
@click.option("--read-timeout", type=float, default=10.0, show_default=True,
              help="Live sources: seconds without data before the source counts as failed.")
@click.pass_context
def produce_video_cmd(ctx, source, stream_id, fps, every, encoding, max_frames, skip_oversized, realtime, max_side,
                      jpeg_quality, rtsp_transport, open_timeout, read_timeout) -> None:
    """Decode a video file or a live source with PyAV and publish sampled frames to `frames`.

    SOURCE is a file, or a live source FFmpeg opens: rtsp://, rtmp://, http(s):// (incl. HLS), or a
    V4L2 device (/dev/video0). A live source is read as it sends (no reading ahead) until it ends,
    --max-frames, or Ctrl-C. Many cameras with reconnects: `inferstream cameras`."""
    from operators.video import SourceOptions
    from streams.produce import produce_video

    options = SourceOptions(rtsp_transport=rtsp_transport, open_timeout_s=open_timeout, read_timeout_s=read_timeout)
    report = produce_video(_settings(ctx), source, stream_id, fps=fps, every=every, encoding=encoding,
                           max_frames=max_frames, skip_oversized=skip_oversized, show_progress=sys.stderr.isatty(),
                           realtime=realtime, max_side=max_side, jpeg_quality=jpeg_quality, source_options=options)
    click.echo(json.dumps(report.as_dict()))


@main.command()
@click.argument("cameras_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--web-port", type=int, default=6070, show_default=True,
              help="Port of this ingester's /metrics and /health (0: any free port).")
@click.option("--web-host", help="Address to listen on (default INFERSTREAM_WEB_HOST, 127.0.0.1).")
@click.pass_context
def cameras(ctx, cameras_file, web_port, web_host) -> None:
    """Ingest the live cameras of CAMERAS_FILE into `frames` until SIGTERM or Ctrl-C.

    Per camera: reconnects with capped exponential backoff, a `session` header that changes on each
    reconnect, frames scaled to max_side before JPEG encoding, and only the newest frames kept when the
    broker is slower than the cameras (drops counted). Prints one JSON line when ready, and the final
    per-camera counts when stopped."""
    from streams.cameras import serve_cameras
    from streams.logs import logging_config

    settings = _settings(ctx)
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))
    final = serve_cameras(settings, cameras_file, web_host=web_host or settings.web_host, web_port=web_port,
                          announce=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(final))


def _jsonl_command(kind: str):
    @click.argument("path", type=click.Path(exists=True, dir_okay=False))
    @click.option("--skip-invalid", is_flag=True, help="Report and skip invalid lines instead of refusing the file.")
    @click.pass_context
    def command(ctx, path, skip_invalid) -> None:
        from streams.produce import produce_jsonl

        report = produce_jsonl(_settings(ctx), kind, path, skip_invalid, show_progress=sys.stderr.isatty())
        click.echo(json.dumps(report.as_dict()))

    command.__doc__ = f"Validate a JSONL file and publish it to `{kind}` (all lines valid, or nothing is sent)."
    return command


produce.command("posts")(_jsonl_command("posts"))
produce.command("events")(_jsonl_command("events"))


@main.command()
@click.argument("topic")
@click.option("--count", type=int, help="Stop after N records.")
@click.option("--timeout", "timeout_s", type=float, help="Stop after S seconds.")
@click.option("--from-end", is_flag=True, help="Only new records (default: from the beginning).")
@click.option("--with-meta", is_flag=True, help="Wrap each value with topic, partition, offset, key, headers.")
@click.pass_context
def tail(ctx, topic, count, timeout_s, from_end, with_meta) -> None:
    """Print a topic's records as JSON lines. Exits 1 if --count was not reached before --timeout."""
    from streams.tail import run_tail

    printed = run_tail(_settings(ctx), topic, count=count, timeout_s=timeout_s, from_beginning=not from_end,
                       with_meta=with_meta)
    if count is not None and printed < count:
        click.echo(f"inferstream: only {printed} of {count} records before the timeout", err=True)
        sys.exit(1)


@main.command()
@click.option("--source", required=True, type=click.Choice(["posts", "frames", "events"]),
              help="Topic to re-process (events: recommendation lists of the users active in the range).")
@click.option("--from", "start", help="Range start: ISO-8601 time, OFFSET (every partition), P:O,P:O, or earliest (default).")
@click.option("--to", "end", help="Range end (exclusive): ISO-8601 time, OFFSET, P:O,..., or latest (default: the end now).")
@click.option("--output", required=True, help="Topic for the replayed verdicts (keys name the model versions).")
@click.option("--model", "models", multiple=True, help="Pin NAME@VERSION for the checks that use NAME (repeatable).")
@click.option("--policy", type=click.Path(exists=True, dir_okay=False), help="Policy file (default: INFERSTREAM_POLICY).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write a version-diff report (JSON) here.")
@click.option("--compare-topic", help="Baseline verdicts for --report (default: the live verdicts topic).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Resume file (default: derived from the arguments).")
@click.option("--restart", is_flag=True, help="Ignore an existing checkpoint and start over.")
@click.option("--batch-size", default=64, show_default=True, help="Micro-batch size (replays are throughput-bound).")
@click.option("--dead-letters", help="Topic for bad records (default: the dead-letters topic).")
@click.option("--checkpoint-interval", default=1.0, show_default=True, help="Seconds between checkpoint writes.")
@click.pass_context
def replay(ctx, source, start, end, output, models, policy, report, compare_topic, checkpoint, restart, batch_size,
           dead_letters, checkpoint_interval) -> None:
    """Re-process a range of posts or frames with pinned models into OUTPUT, under no consumer group."""
    from pathlib import Path

    from streams.replay import ReplayError, ReplayOptions, run_replay
    from streams.replay_range import parse_bound
    from streams.replay_report import replay_report

    settings = _settings(ctx)
    try:
        options = ReplayOptions(source=source, output=output, start=parse_bound(start), end=parse_bound(end),
                                policy=policy, models=tuple(models), checkpoint=Path(checkpoint) if checkpoint else None,
                                restart=restart, batch_size=batch_size, progress=sys.stderr.isatty(),
                                dead_letters=dead_letters, checkpoint_interval_s=checkpoint_interval)
        summary = run_replay(settings, options)
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(summary))
    if report:
        result, text = asyncio.run(replay_report(settings, summary, compare_topic, lists=source == "events"))
        Path(report).write_text(json.dumps(result, indent=2))
        click.echo(text, err=True)


@main.command()
@click.option("--port", default=9092, show_default=True, help="Port of the embedded broker.")
@click.option("--seconds", default=6.0, show_default=True, help="Length of the sample video.")
@click.option("--keep-running", is_flag=True, help="Keep broker and worker up after the demo data.")
def demo(port: int, seconds: float, keep_running: bool) -> None:
    """Start broker + worker, publish a sample video, print verdicts as they arrive (Ctrl-C stops all)."""
    from streams.demo import run_demo

    sys.exit(run_demo(port=port, seconds=seconds, keep_running=keep_running))


@main.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@click.pass_context
def config_show(ctx) -> None:
    """Print the effective settings (secrets redacted)."""
    click.echo(json.dumps(_settings(ctx).redacted(), indent=2))


@main.group()
def models() -> None:
    """Inspect the model repository."""


@models.command("list")
@click.pass_context
def models_list(ctx) -> None:
    """List models, versions, tasks and their tensors."""
    from operators.model_repository import ModelConfigError, ModelRef, ModelRepository

    repo = ModelRepository(_settings(ctx).model_dir)
    for name in repo.names():
        for version in repo.versions(name):
            try:
                loaded = repo.load(ModelRef.of(name, version), providers=("cpu",))
                row = {"model": name, "version": version, "task": loaded.config.task, **loaded.session.describe()}
            except ModelConfigError as exc:
                row = {"model": name, "version": version, "error": str(exc)}
            click.echo(json.dumps(row))


@models.command("promote")
@click.argument("ref")
@click.pass_context
def models_promote(ctx, ref) -> None:
    """Make candidate NAME@VERSION the version a bare NAME resolves to (picked up at the next load)."""
    from operators.model_repository import ModelRef, ModelRepository

    ref = ModelRef(ref)
    if not ref.version:
        raise click.UsageError("expected NAME@VERSION")
    repo = ModelRepository(_settings(ctx).model_dir)
    repo.promote(ref.name, ref.version)
    click.echo(json.dumps({"model": ref.name, "serving_version": repo.serving_version(ref.name)}))


@models.command("quantize")
@click.argument("name")
@click.option("--version", help="Version to quantize (default: the newest).")
@click.option("--to", "to", type=click.Choice(["int8", "fp16"]), default="int8", show_default=True)
@click.option("--max-accuracy-drop", default=0.01, show_default=True,
              help="Refuse to promote when top-1 disagreement (or relative output error) exceeds this.")
@click.option("--drop-rejected", is_flag=True, help="Delete the new version when it fails the accuracy bound.")
@click.pass_context
def models_quantize(ctx, name, version, to, max_accuracy_drop, drop_rejected) -> None:
    """Quantize a model into a new version and report size, speed and accuracy against the original."""
    from operators.model_repository import ModelRef
    from operators.quantize import Plan, quantize

    report = quantize(_settings(ctx).model_dir, Plan(ModelRef.of(name, version), to=to, max_accuracy_drop=max_accuracy_drop,
                                                     keep_rejected=not drop_rejected))
    click.echo(json.dumps(report, indent=2))
    if not report.get("promote_ok"):
        click.echo(f"inferstream: {name} {to}: accuracy drop over {max_accuracy_drop}: not promotable", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
