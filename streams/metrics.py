"""Prometheus metrics of a worker, served at GET /metrics on the worker's web port.

Conventions: units in names (`_seconds`, `_records`), counters end in `_total`, labels are bounded
(topic, model, version, reason, check, partition): never a per-record or per-user label.
Buckets cover a 1 ms text model and a 100 ms detector alike.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

RECORDS_CONSUMED = Counter("inferstream_records_consumed_total", "Input records read by agents",
                           ["topic"], registry=REGISTRY)
RECORDS_PRODUCED = Counter("inferstream_records_produced_total", "Output records delivered (acknowledged by the broker)",
                           ["topic"], registry=REGISTRY)
DEAD_LETTERS = Counter("inferstream_dead_letters_total", "Input records sent to dead-letters, by reason",
                       ["topic", "reason"], registry=REGISTRY)
UNKNOWN_ITEMS = Counter("inferstream_unknown_items_total", "Events skipped because their item is not in the catalogue",
                        ["topic"], registry=REGISTRY)
VERDICTS = Counter("inferstream_verdicts_total", "Moderation verdicts by input kind and outcome",
                   ["kind", "safe"], registry=REGISTRY)
VIOLATIONS = Counter("inferstream_violations_total", "Policy violations by check", ["check"], registry=REGISTRY)
ALERTS = Counter("inferstream_alerts_total", "Stream alert episodes started and ended, by check", ["check", "event"],
                 registry=REGISTRY)
ALERT_INPUTS_IGNORED = Counter("inferstream_alert_inputs_ignored_total",
                               "Records of the verdicts topic the alert agent could not read as verdicts", registry=REGISTRY)
END_TO_END = Histogram("inferstream_end_to_end_latency_seconds",
                       "Input record timestamp to output produced", ["topic"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
INFERENCE = Histogram("inferstream_inference_latency_seconds", "One batch through a model (session run + postprocess)",
                      ["model", "version"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram("inferstream_batch_size_records", "Records per model batch", ["model", "version"],
                       buckets=BATCH_BUCKETS, registry=REGISTRY)
BATCH_WAIT = Histogram("inferstream_batch_wait_seconds", "How long a model batch was held for more records after its first one",
                       ["model", "version"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
BATCH_LIMIT = Gauge("inferstream_batch_limit_records", "Records the batch controller let the last batch take",
                    ["model", "version"], registry=REGISTRY)
BATCH_COST = Gauge("inferstream_batch_cost_seconds", "Fitted batch cost seconds = fixed + per_record * n (term: fixed, "
                   "per_record; absent during the controller's warm-up)", ["model", "version", "term"], registry=REGISTRY)
BATCH_LATE = Counter("inferstream_batch_late_records_total", "Records whose time in the batcher (queue, wait, run) passed "
                     "the model's batching.target_p99_ms", ["model", "version"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("inferstream_batcher_queue_depth_records", "Records waiting for a model batch",
                    ["model", "version"], registry=REGISTRY)
FETCHED_RECORDS = Histogram("inferstream_fetched_batch_records", "Records handed to an agent at once (one fetch of its topic)",
                            ["topic"], buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384), registry=REGISTRY)
DEGRADATION_LEVEL = Gauge("inferstream_degradation_level", "Rung of a model's degradation ladder in force (0: full quality)",
                          ["model"], registry=REGISTRY)
FRAMES_SKIPPED = Counter("inferstream_frames_skipped_total", "Frames not judged because a degraded rung's frame stride skipped them",
                         ["topic"], registry=REGISTRY)
IN_FLIGHT = Gauge("inferstream_in_flight_records", "Records consumed but not yet acked (decoding, inferring, delivering)",
                  ["topic"], registry=REGISTRY)
IN_FLIGHT_LIMIT = Gauge("inferstream_in_flight_limit_records",
                        "Records an agent may hold in flight before consumption pauses (max_in_flight, or the frames/events one)",
                        ["topic"], registry=REGISTRY)
CONSUMER_LAG = Gauge("inferstream_consumer_lag_records",
                     "High watermark minus position, per assigned partition (absent where it cannot be trusted)",
                     ["topic", "partition"], registry=REGISTRY)
LAG_AVAILABLE = Gauge("inferstream_consumer_lag_available", "1 when consumer lag is reported, 0 when it is not trustworthy "
                      "on this broker", registry=REGISTRY)
MODEL_INFO = Gauge("inferstream_model_info", "Loaded models (value 1) with their version and execution provider",
                   ["model", "version", "task", "provider"], registry=REGISTRY)
MALLOC_INFO = Gauge("inferstream_malloc_info", "The allocator serving this worker (value 1): glibc, or one preloaded "
                    "such as jemalloc (the Docker images preload it)", ["allocator"], registry=REGISTRY)
# malloc_trim_every_s (off by default): each trim's time (it holds each glibc arena's lock) and what it gave back
MALLOC_TRIM = Histogram("inferstream_malloc_trim_seconds", "One malloc_trim over every glibc arena",
                        buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0), registry=REGISTRY)
MALLOC_TRIMMED = Counter("inferstream_malloc_trimmed_bytes_total", "RSS handed back to the system by malloc_trim",
                         registry=REGISTRY)
MODEL_LOADS = Counter("inferstream_model_loads_total", "Model load attempts by outcome", ["model", "version", "outcome"],
                      registry=REGISTRY)
SYNC_IN_FLIGHT = Gauge("inferstream_sync_in_flight_requests",
                       "Synchronous API calls (REST and gRPC) admitted and not yet answered, per model",
                       ["model"], registry=REGISTRY)
SYNC_REJECTED = Counter("inferstream_sync_rejected_total",
                        "Synchronous API calls refused (reason in_flight_limit) or cut short (reason deadline_exceeded)",
                        ["api", "model", "reason"], registry=REGISTRY)
API_RESPONSES = Counter("inferstream_api_responses_total",
                        "Answers of the synchronous and admin API: HTTP status (api=rest) or gRPC status name (api=grpc)",
                        ["api", "code"], registry=REGISTRY)
