"""The Faust app: topics, agents, and the worker entry point.

Agents are thin: read raw bytes (no Faust deserialisation, so a bad record can never crash the
stream), hand each event to a pipeline, and let OrderedAcker ack it once its output is delivered.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import faust

from operators.model_repository import ModelRepository
from operators.moderation import Moderator
from operators.policy import Policy
from operators.registry import ModelRegistry
from operators.stages import RegistryHooks, Stage
from streams import metrics, web
from streams.batches import batches_of, use_batching_consumer
from streams.config import Settings
from streams.cores import share_cores
from streams.kafka import PartitionsByKey
from streams.memory import allocator, trim_and_report, tune_malloc
from streams.moderation import ModerationPipeline, source_of
from streams.ordered import OrderedAcker, Output
from streams.schemas import EVENTS, FRAMES, POSTS, RECOMMENDATION_REQUESTS, VERDICTS
from streams.serving_api import ServingAPI

log = logging.getLogger(__name__)


def _shorten_fetch_wait(max_wait_ms: int) -> None:
    """Faust hard-codes fetch_max_wait_ms=1500 for its consumer. Apache Kafka answers a fetch as soon as
    data arrives, but the embedded broker holds every fetch for the full wait (measured: p50 415 ms per
    record at 1500 ms, 3.6 ms at 50 ms), so we set the wait from our settings before the consumer starts."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = getattr(AIOKafkaConsumerThread._create_worker_consumer, "__wrapped__",
                       AIOKafkaConsumerThread._create_worker_consumer)

    def create(self, transport):
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = max_wait_ms  # read by aiokafka when the consumer starts its fetcher
        return consumer

    create.__wrapped__ = original
    AIOKafkaConsumerThread._create_worker_consumer = create


def faust_credentials(settings: Settings):
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username, password=settings.sasl_password,
            mechanism=settings.sasl_mechanism, ssl_context=settings.ssl_context(),
        )
    if settings.security_protocol == "SSL":
        return faust.SSLCredentials(settings.ssl_context())
    return None


def create_app(settings: Settings) -> faust.App:
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    _shorten_fetch_wait(settings.fetch_max_wait_ms)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        broker_credentials=faust_credentials(settings),
        store="memory://",
        datadir=str(Path(settings.data_dir) / settings.app_id),
        autodiscover=False,
        processing_guarantee="at_least_once",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=settings.max_message_bytes + 64 * 1024,
        consumer_max_fetch_size=settings.max_message_bytes + 64 * 1024,
        producer_acks=-1,
        producer_max_batch_size=settings.producer_batch_bytes,
        web_enabled=True,
        # request bodies up to the largest record we accept (an image for POST /predict)
        web_application_options={"client_max_size": settings.max_message_bytes + 64 * 1024},
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
    )
    use_batching_consumer(app)
    return app


def raw_topic(app: faust.App, settings: Settings, *names: str) -> faust.TopicT:
    """Raw bytes in: values are validated by our own code, so a bad record can never crash a stream."""
    return app.topic(*[settings.topic(n) for n in names], key_type=bytes, value_type=bytes,
                     key_serializer="raw", value_serializer="raw", partitions=settings.partitions)


def _ordered_agent(app: faust.App, settings: Settings, topic_name: str, handle_batch, send, *more_topics: str,
                   background=None, max_in_flight: int | None = None):
    """An agent over raw records of `topic_name` (and `more_topics`), taken a fetch at a time straight
    from the consumer (streams/batches.py), whose outputs (`handle_batch(sources) -> one list of
    outputs per source`) are delivered before each ack; `background()` is a coroutine run alongside
    it (e.g. the recommender loop)."""
    limit = max_in_flight or settings.max_in_flight
    names = [settings.topic(n) for n in (topic_name, *more_topics)]
    # a quarter of the limit at most: the next chunk is taken while earlier ones are still in flight
    # (with chunk == limit each waited for the whole previous one: frames at 128 in flight ran 30% slower)
    chunk = max(1, min(settings.max_batch_records, limit // 4))

    @app.agent(raw_topic(app, settings, topic_name, *more_topics), name=topic_name)
    async def agent(stream):  # the stream subscribes the topics; records arrive through batches_of
        consumer = app.consumer
        acker = OrderedAcker(send, limit, name=settings.topic(topic_name), ack=lambda m: m.ack(consumer))
        delivering = asyncio.ensure_future(acker.run())
        helper = asyncio.ensure_future(background()) if background else None
        try:
            fetched = metrics.FETCHED_RECORDS.labels(settings.topic(topic_name))
            async for messages in batches_of(app, names):
                fetched.observe(len(messages))
                for i in range(0, len(messages), chunk):
                    part = messages[i : i + chunk]
                    await acker.add_batch(part, handle_batch([source_of(m) for m in part]))
        finally:
            await acker.drain(timeout_s=5.0)
            delivering.cancel()
            if helper is not None:
                helper.cancel()

    return agent


def model_metrics() -> RegistryHooks:
    """Registry hooks that keep the model metrics current as versions load, fail and drain."""

    def loaded(stage: Stage) -> None:
        cfg = stage.model.config
        metrics.MODEL_INFO.labels(cfg.name, cfg.version, cfg.task, stage.model.session.provider).set(1)
        metrics.MODEL_LOADS.labels(cfg.name, cfg.version, "ok").inc()
        if stage.batcher is None:
            return
        inference = metrics.INFERENCE.labels(cfg.name, cfg.version)
        sizes = metrics.BATCH_SIZE.labels(cfg.name, cfg.version)
        waits = metrics.BATCH_WAIT.labels(cfg.name, cfg.version)
        limit = metrics.BATCH_LIMIT.labels(cfg.name, cfg.version)
        late = metrics.BATCH_LATE.labels(cfg.name, cfg.version)
        stats, controller = stage.batcher.stats, stage.batcher.controller
        counted = [controller.late]

        def on_batch(size: int, seconds: float) -> None:
            inference.observe(seconds)
            sizes.observe(size)
            waits.observe(stats.waited)
            if controller.last_plan is not None:
                limit.set(controller.last_plan.max_items)
            if controller.late > counted[0]:  # by the controller's total: a failed batch's late records count too
                late.inc(controller.late - counted[0])
                counted[0] = controller.late
            if controller.cost is not None:
                for term, value in zip(("fixed", "per_record"), controller.cost, strict=True):
                    metrics.BATCH_COST.labels(cfg.name, cfg.version, term).set(value)

        stage.batcher.on_batch = on_batch
        metrics.QUEUE_DEPTH.labels(cfg.name, cfg.version).set_function(lambda b=stage.batcher: b.queue_depth)

    def failed(name: str, version: str, detail: str) -> None:
        metrics.MODEL_LOADS.labels(name, version, "error").inc()

    def retired(stage: Stage) -> None:
        cfg = stage.model.config
        for gauge, labels in ((metrics.MODEL_INFO, (cfg.name, cfg.version, cfg.task, stage.model.session.provider)),
                              (metrics.QUEUE_DEPTH, (cfg.name, cfg.version)),
                              (metrics.BATCH_LIMIT, (cfg.name, cfg.version)),
                              (metrics.BATCH_COST, (cfg.name, cfg.version, "fixed")),
                              (metrics.BATCH_COST, (cfg.name, cfg.version, "per_record"))):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass  # never set (a model without a batcher): nothing to remove

    return RegistryHooks(on_loaded=loaded, on_failed=failed, on_retired=retired)


def _instrument(app: faust.App, settings: Settings, moderator: Moderator) -> None:
    """Consumer lag from the fetch high watermark (model metrics come from the registry's hooks); the
    lag of the topics a model reads is its batch controller's backlog hint (a backlog upstream: fill
    batches for throughput)."""
    reported: set = set()
    lag_topics = {"image": (settings.topic(FRAMES), settings.topic(POSTS)), "text": (settings.topic(POSTS),)}

    @app.timer(interval=1.0)
    async def report_lag() -> None:
        # High watermark from fetch responses minus the committed offset. Measured on the embedded broker:
        # its ListOffsets "latest" is wrong (end_offsets said 1 for 500 records) but fetch responses carry
        # the right high watermark (500), so this works on tansu and on Apache Kafka alike.
        consumer = app.consumer
        current = set()
        lags: dict[str, int] = {}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            committed = consumer._committed_offset.get(tp)  # Faust keeps no public accessor
            if highwater is None or committed is None:
                continue
            lag = max(0, highwater - committed)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
            lags[tp.topic] = lags.get(tp.topic, 0) + lag
            current.add((tp.topic, str(tp.partition)))
        for gone in reported - current:
            metrics.CONSUMER_LAG.remove(*gone)
        reported.clear()
        reported.update(current)
        metrics.LAG_AVAILABLE.set(1 if current else 0)
        for stage in moderator.stages.values():
            topics = lag_topics.get(stage.input_kind or "", ())
            stage.batcher.controller.backlog_hint(sum(lags.get(t, 0) for t in topics))
        for name, ladder in moderator.ladders.items():  # sustained lag steps a model down its ladder
            topics = {t for kind in moderator.inputs_of(name) for t in lag_topics.get(kind, ())}
            metrics.DEGRADATION_LEVEL.labels(name).set(ladder.observe(sum(lags.get(t, 0) for t in topics)))


def build_worker_app(settings: Settings) -> faust.App:
    """The app with every agent registered and its models loaded (loaded before the worker joins the
    group, so no partition is held while a model is still loading). The model registry polls the
    repository for new versions and serving-state changes; REST routes share the web port, and gRPC
    runs on `grpc_port` when it is set."""
    tune_malloc(settings)
    metrics.MALLOC_INFO.labels(allocator()).set(1)
    app = create_app(settings)
    share_cores(settings)
    providers = settings.provider_list
    registry = ModelRegistry(ModelRepository(settings.model_dir), providers, settings.intra_op_threads or None,
                             hooks=model_metrics())
    moderator = Moderator(registry.repo, Policy.load(settings.policy), registry=registry)
    moderation = ModerationPipeline(settings, moderator)
    web.install(app, web.WorkerState(lambda: moderator.model_info))
    web.install_api(app, ServingAPI(registry, settings, moderation))
    _instrument(app, settings, moderator)
    if settings.malloc_trim_every_s > 0:

        @app.timer(interval=settings.malloc_trim_every_s)
        async def trim_memory() -> None:  # in a thread: it walks every arena, holding each one's lock
            released, seconds = await asyncio.to_thread(trim_and_report)
            metrics.MALLOC_TRIM.observe(seconds)
            metrics.MALLOC_TRIMMED.inc(released)

    @app.task
    async def watch_models() -> None:
        await registry.watch()

    if settings.grpc_port:
        from streams.grpc_server import GrpcServer

        @app.task
        async def serve_grpc() -> None:
            await GrpcServer(registry, settings.web_host, settings.grpc_port).serve_forever()

    # Faust's producer wraps aiokafka's, whose public partitions_for() waits for the topic's metadata
    partition_of = PartitionsByKey(lambda topic: app.producer._ensure_producer().partitions_for(topic))

    async def send(output: Output):
        partition = output.partition
        if partition is None and output.partition_key is not None:
            partition = await partition_of(output.topic, output.partition_key)
        return await app.producer.send(output.topic, output.key, output.value, partition, None, output.headers)

    _ordered_agent(app, settings, FRAMES, moderation.handle_frames, send, max_in_flight=settings.frames_max_in_flight)
    _ordered_agent(app, settings, POSTS, moderation.handle_posts, send)
    _recommendation_agent(app, settings, send)
    # without an image check no verdict can raise an alert: no agent reading every verdict back
    if settings.alerts and moderator.policy.alerted_checks:
        _alert_agent(app, settings, moderator.policy.alerts, send)
    elif settings.alerts:
        log.info("stream alerts off: the policy has no image check")
    return app


def _alert_agent(app: faust.App, settings: Settings, rule, send) -> None:
    """Frame verdicts -> per-stream alert state -> alerts (streams/alerts.py)."""
    from streams.alerts import AlertPipeline

    pipeline = AlertPipeline(settings, rule)

    @app.on_partitions_revoked.connect
    async def _forget(sender, revoked, **kwargs) -> None:
        pipeline.store.forget({tp.partition for tp in revoked if tp.topic == settings.topic(VERDICTS)})

    _ordered_agent(app, settings, VERDICTS, pipeline.handle_batch, send)


def _recommendation_agent(app: faust.App, settings: Settings, send) -> None:
    """Events and recommendation requests -> user state -> lists (streams/recommend.py)."""
    if settings.recommendations == "off":
        return
    from operators.ranking import CandidateRanker
    from operators.retrieval import CFRetriever
    from streams.recommend import RecommendationPipeline, Recommender, StateStore

    repo = ModelRepository(settings.model_dir)
    try:
        retriever = CFRetriever.from_repository(repo, settings.retrieval_model)
        ranker = CandidateRanker(repo.load(settings.ranking_model)) if settings.ranking_model else None
    except Exception as exc:
        if settings.recommendations == "on":
            raise
        log.warning("recommendations off: %s (set INFERSTREAM_RECOMMENDATIONS=on to make this fatal)", exc)
        return
    store = StateStore(settings)
    recommender = Recommender(settings, retriever, ranker, send)
    pipeline = RecommendationPipeline(settings, store, recommender)

    @app.on_partitions_revoked.connect
    async def _forget(sender, revoked, **kwargs) -> None:
        store.forget({tp.partition for tp in revoked if tp.topic == settings.topic(EVENTS)})

    # events wait (unacked) for their debounced list: the window must hold rec_debounce_s of traffic
    _ordered_agent(app, settings, EVENTS, pipeline.handle_batch, send, RECOMMENDATION_REQUESTS, background=recommender.run,
                   max_in_flight=settings.events_max_in_flight)
    log.info("recommendations from %s", recommender.models)
