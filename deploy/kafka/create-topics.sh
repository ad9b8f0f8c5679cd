#!/bin/sh
# One-shot topic creation for the compose stack (service `topic-init`), idempotent: creates the
# inferstream topics that do not exist yet, then (re)applies their configs, so a changed retention
# or size limit reaches existing topics too. Partition counts are never lowered (Kafka cannot).
#
# Environment (defaults in brackets):
#   BOOTSTRAP_SERVER [kafka:9092]   TOPIC_PREFIX [""]   TOPICS [the nine inferstream topics]
#   PARTITIONS [4]   REPLICATION_FACTOR [1]
#   INFERSTREAM_MAX_MESSAGE_BYTES [1000000]: the workers' value; topics get it + 64 KiB of record
#       overhead, exactly as streams/kafka.py ensure_topics() does
#   RETENTION_MS_FRAMES [3600000]  RETENTION_MS [604800000]  RETENTION_MS_DEAD_LETTERS [1209600000]
#   KAFKA_BIN [/opt/kafka/bin]
set -eu

BOOTSTRAP_SERVER="${BOOTSTRAP_SERVER:-kafka:9092}"
TOPIC_PREFIX="${TOPIC_PREFIX:-}"
TOPICS="${TOPICS:-frames posts events verdicts recommendations dead-letters recommendation-requests user-state shadow-verdicts alerts alert-state}"
PARTITIONS="${PARTITIONS:-4}"
REPLICATION_FACTOR="${REPLICATION_FACTOR:-1}"
INFERSTREAM_MAX_MESSAGE_BYTES="${INFERSTREAM_MAX_MESSAGE_BYTES:-1000000}"
RETENTION_MS_FRAMES="${RETENTION_MS_FRAMES:-3600000}"                 # 1 h: raw frames are big and stale fast
RETENTION_MS="${RETENTION_MS:-604800000}"                             # 7 days
RETENTION_MS_DEAD_LETTERS="${RETENTION_MS_DEAD_LETTERS:-1209600000}"  # 14 days: time to inspect and replay
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"

TOPIC_MAX_MESSAGE_BYTES=$((INFERSTREAM_MAX_MESSAGE_BYTES + 65536))

for name in $TOPICS; do
    topic="${TOPIC_PREFIX}${name}"
    policy="delete"
    case "$name" in
        frames) retention="$RETENTION_MS_FRAMES" ;;
        dead-letters) retention="$RETENTION_MS_DEAD_LETTERS" ;;
        user-state) retention="-1"; policy="compact" ;;   # the recommender's changelog: last state per user
        alert-state) retention="-1"; policy="compact" ;;  # the alert agent's changelog: last state per stream
        *) retention="$RETENTION_MS" ;;
    esac
    configs="max.message.bytes=${TOPIC_MAX_MESSAGE_BYTES},retention.ms=${retention},cleanup.policy=${policy}"
    echo "topic-init: ${topic} (partitions=${PARTITIONS}, replication=${REPLICATION_FACTOR}, ${configs})"
    "$KAFKA_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP_SERVER" --create --if-not-exists \
        --topic "$topic" --partitions "$PARTITIONS" --replication-factor "$REPLICATION_FACTOR" \
        --config "max.message.bytes=${TOPIC_MAX_MESSAGE_BYTES}" --config "retention.ms=${retention}" \
        --config "cleanup.policy=${policy}"
    "$KAFKA_BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP_SERVER" --alter \
        --entity-type topics --entity-name "$topic" --add-config "$configs"
done

"$KAFKA_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP_SERVER" --describe --topics-with-overrides
echo "topic-init: done"
