"""Settings: one typed object, from defaults <- a YAML file (INFERSTREAM_CONFIG) <- environment.

Every field `x` can be set by the environment variable `INFERSTREAM_X`. Secrets (SASL password,
API tokens) come only from here, never from code.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
REPO_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"
SECRET_FIELDS = {"sasl_password", "api_token"}


@dataclass(frozen=True)
class Settings:
    # Kafka
    broker: str = "127.0.0.1:9092"  # comma-separated bootstrap servers
    topic_prefix: str = ""
    partitions: int = 4
    app_id: str = "inferstream"  # Faust app id = consumer group of the workers
    # Dev/test-friendly group timings; the embedded broker makes a join wait ~half the session timeout.
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 3.0
    commit_interval_s: float = 1.0
    # Upper bound on a fetch's wait for data. The embedded broker always waits this long (no early
    # answer when data arrives), so it bounds latency there; Apache Kafka answers early anyway.
    fetch_max_wait_ms: int = 50
    replication_factor: int = 1
    # Kafka's default message.max.bytes is 1,048,588; frames over this are refused at the producer.
    max_message_bytes: int = 1_000_000
    # Bytes per producer batch and partition. aiokafka keeps one request in flight per broker, each
    # with at most one batch per partition: at Kafka's 16 KiB default, ~25 verdicts per partition per
    # round trip capped a worker at ~2,400 verdicts/s (measured); keep it under topics' max.message.bytes.
    producer_batch_bytes: int = 512 * 1024
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str = "PLAIN"  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    # Models and inference
    model_dir: str = str(REPO_MODELS)
    policy: str = str(REPO_POLICY)  # moderation policy: checks, models, thresholds
    providers: str = ""  # e.g. "cuda,cpu"; empty = each model config's own preference
    # How the worker's threads share the cores (streams/cores.py has the measured rule)
    intra_op_threads: int = 0  # every model's ONNX Runtime intra-op threads; 0 = each model config's own
    intra_op_spinning: bool = False  # let ONNX Runtime's threads busy-wait between operators
    decode_threads: int = 0  # JPEG decode/preprocess threads; 0 = one per usable core
    gil_switch_interval_ms: float = 0.5  # Python's default is 5 ms; 0 leaves it
    # glibc malloc (streams/memory.py has the measurements): arenas for all threads, and the size from
    # which a buffer is mapped on its own and returned when freed; 0 (the default) leaves glibc's own:
    # 2 and 256 cost frames 17% of their speed, and the soak did not show them keeping memory flat
    malloc_arenas: int = 0
    malloc_mmap_threshold_kb: int = 0
    # hand freed arena pages back to the system this often; 0 (the default): never. In a 10-minute
    # soak trial it returned 250-320 MB after warm-up, but the pair fell behind (p50 50 s vs 2 s)
    malloc_trim_every_s: float = 0.0
    # JPEGs at least twice a model's input are decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT
    # (never smaller than what every model reading the image resizes to); false: always full size
    decode_reduced: bool = True
    max_in_flight: int = 1024  # records decoded/inferring per agent before consuming pauses
    # frames hold their decoded and preprocessed tensors while they wait (~1.1 MB at 640x480 with the
    # default policy): catching up a backlog, 1024 in flight peaked at 2.36 GB, 128 at 1.34 GB and 32
    # at 1.14 GB, all at the same speed (bench/backlog_memory.py, sessions 4 and 9); 32 keep two
    # batches of 16 ready, one inferring while the next is decoded
    frames_max_in_flight: int = 32
    max_batch_records: int = 256  # records an agent takes from its stream at once (one batch of work)
    # Recommendations
    recommendations: str = "auto"  # auto: on when the models below load; on: they must; off
    alerts: bool = True  # stream alerts from frame verdicts (rule: `alerts` in the policy) to the alerts topic
    retrieval_model: str = "cf-retrieval"
    ranking_model: str = "deepfm-ctr"  # empty: lists ranked by retrieval score alone
    rec_on_kinds: str = "click,purchase"  # event kinds that ask for a fresh list
    rec_every_n_events: int = 5  # ... or every N events of a user
    rec_debounce_s: float = 1.0  # requests for one user within this window share one list
    rec_k: int = 10
    events_max_in_flight: int = 8192  # events awaiting their debounced list before consuming pauses
    max_event_future_s: float = 300.0  # events stamped further ahead are dead-lettered
    # Input limits (dead-lettered beyond these)
    max_image_side: int = 8192
    max_image_pixels: int = 40_000_000
    # Worker
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    grpc_port: int = 0  # gRPC Predict/BatchPredict + health on web_host:grpc_port; 0 = off
    # Synchronous API (REST /predict, /moderate; gRPC Predict, BatchPredict): bodies and gRPC messages
    # are limited by max_message_bytes; beyond sync_max_in_flight calls of one model, calls are refused
    # at once (429 / RESOURCE_EXHAUSTED) with Retry-After: sync_retry_after_s.
    sync_max_in_flight: int = 32  # per model, REST and gRPC together; 0 = no limit
    sync_retry_after_s: int = 1  # Retry-After (whole seconds) of a refused call
    sync_timeout_s: float = 0.0  # longest wait for a result, also caps a client's deadline; 0 = none
    data_dir: str = ".inferstream"
    log_level: str = "info"
    log_format: str = "text"  # text | json (one JSON object per line, with record coordinates)
    api_token: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        path = path or env.get("INFERSTREAM_CONFIG")
        if path:
            raw = yaml.safe_load(Path(path).read_text()) or {}
            unknown = set(raw) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
            values.update(raw)
        for f in fields(cls):
            key = f"INFERSTREAM_{f.name.upper()}"
            if key in env:
                values[f.name] = env[key]
        return cls(**{k: _coerce(cls.__dataclass_fields__[k].type, v) for k, v in values.items()})

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The INFERSTREAM_* variables that reproduce these settings in a child process."""
        return {f"INFERSTREAM_{k.upper()}": str(v) for k, v in dataclasses.asdict(self).items()}

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def provider_list(self) -> tuple[str, ...] | None:
        """`providers` as the registry takes them; None: each model config's own preference."""
        return tuple(p.strip() for p in self.providers.split(",") if p.strip()) or None

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.broker.split(",") if s.strip()]

    def redacted(self) -> dict[str, Any]:
        return {k: ("***" if k in SECRET_FIELDS and v else v) for k, v in dataclasses.asdict(self).items()}

    def ssl_context(self) -> ssl.SSLContext | None:
        if "SSL" not in self.security_protocol:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_cafile or None)
        if self.ssl_certfile:
            ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
        return ctx

    def kafka_client_options(self) -> dict[str, Any]:
        """Security options for every aiokafka client (producer, consumer, admin)."""
        opts: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            opts.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password)
        ctx = self.ssl_context()
        if ctx is not None:
            opts["ssl_context"] = ctx
        return opts


def _coerce(type_name: Any, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "str")
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return value.strip().lower() in ("1", "true", "yes", "on")
    return value
