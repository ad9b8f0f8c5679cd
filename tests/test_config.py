"""Settings: defaults <- YAML file <- environment; secrets; Kafka client options."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from streams.config import Settings


def test_defaults_when_nothing_is_set():
    s = Settings.load(env={})
    assert s == Settings()


def test_load_from_environment_coerces_types():
    s = Settings.load(env={"INFERSTREAM_BROKER": "k1:9092,k2:9093", "INFERSTREAM_PARTITIONS": "12",
                           "INFERSTREAM_SESSION_TIMEOUT_S": "7.5", "UNRELATED": "x"})
    assert s.broker == "k1:9092,k2:9093"
    assert s.partitions == 12 and isinstance(s.partitions, int)
    assert s.session_timeout_s == 7.5 and isinstance(s.session_timeout_s, float)
    assert s.bootstrap_servers == ["k1:9092", "k2:9093"]


def test_non_numeric_integer_setting_raises_value_error():
    with pytest.raises(ValueError):
        Settings.load(env={"INFERSTREAM_PARTITIONS": "many"})


def test_load_from_yaml_file(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"broker": "file:9092", "partitions": 3, "topic_prefix": "prod-"}))
    s = Settings.load(path, env={})
    assert (s.broker, s.partitions, s.topic_prefix) == ("file:9092", 3, "prod-")


def test_config_file_path_can_come_from_environment(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"app_id": "from-file"}))
    assert Settings.load(env={"INFERSTREAM_CONFIG": str(path)}).app_id == "from-file"


def test_environment_overrides_yaml_file(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"broker": "file:9092", "partitions": 3, "app_id": "file-app"}))
    s = Settings.load(path, env={"INFERSTREAM_BROKER": "env:9092", "INFERSTREAM_PARTITIONS": "9"})
    assert s.broker == "env:9092"
    assert s.partitions == 9
    assert s.app_id == "file-app"  # not overridden, so the file's value stays


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("")
    assert Settings.load(path, env={}) == Settings()


def test_unknown_key_in_file_raises_value_error(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"broker": "x:1", "brokers": "typo:1"}))
    with pytest.raises(ValueError, match="brokers"):
        Settings.load(path, env={})


def test_redacted_hides_secrets_that_are_set():
    s = Settings(sasl_password="hunter2", api_token="tok-123", sasl_username="alice")
    red = s.redacted()
    assert red["sasl_password"] == "***"
    assert red["api_token"] == "***"
    assert red["sasl_username"] == "alice"
    assert "hunter2" not in repr(red) and "tok-123" not in repr(red)
    assert set(red) == {f.name for f in dataclasses.fields(Settings)}


def test_redacted_leaves_empty_secrets_visibly_empty():
    red = Settings().redacted()
    assert red["sasl_password"] == "" and red["api_token"] == ""


def test_sasl_plaintext_client_options_include_credentials():
    s = Settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                 sasl_username="alice", sasl_password="hunter2")
    assert s.kafka_client_options() == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "alice", "sasl_plain_password": "hunter2",
    }


def test_plaintext_client_options_have_no_credentials_or_ssl():
    s = Settings(sasl_username="alice", sasl_password="hunter2")
    assert s.kafka_client_options() == {"security_protocol": "PLAINTEXT"}
    assert s.ssl_context() is None


def test_ssl_protocol_gets_an_ssl_context():
    opts = Settings(security_protocol="SSL").kafka_client_options()
    assert opts["security_protocol"] == "SSL"
    assert "ssl_context" in opts
    assert "sasl_plain_password" not in opts


def test_topic_applies_the_prefix():
    assert Settings(topic_prefix="t123-").topic("frames") == "t123-frames"
    assert Settings().topic("frames") == "frames"


def test_to_env_round_trips_through_load():
    s = Settings(broker="b:1", partitions=7, session_timeout_s=2.5, topic_prefix="p-", api_token="tok")
    assert Settings.load(env=s.to_env()) == s


def test_faust_gets_the_same_sasl_and_ssl_settings_as_the_kafka_clients(tmp_path):
    import faust

    from streams.app import faust_credentials

    sasl = Settings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                    sasl_password="s3cret")
    creds = faust_credentials(sasl)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism.value) == ("svc", "s3cret", "SCRAM-SHA-512")
    assert creds.ssl_context is not None  # SASL_SSL: TLS as well
    assert isinstance(faust_credentials(Settings(security_protocol="SSL")), faust.SSLCredentials)
    assert faust_credentials(Settings()) is None
    assert "s3cret" not in str(sasl.redacted())
