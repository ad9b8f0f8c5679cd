"""Pure inference building blocks (no Kafka, no Faust): sessions, batching, pre/post-processing."""
