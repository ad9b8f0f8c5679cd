"""The Kafka side of inferstream: topics and schemas, Faust agents, producers, CLI."""
