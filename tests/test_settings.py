"""Worker settings: SPEC defaults, plain-string env lists, and errors that name the variable.

An operator sees only the message of :class:`SettingsError` when the worker
refuses to start, so the tests check that message names every bad
``RISKGATE_*`` variable.
"""

from __future__ import annotations

import json
import ssl

import pydantic
import pytest

from streams.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No RISKGATE_* variable of the developer's shell leaks into a test."""
    import os

    for name in list(os.environ):
        if name.startswith("RISKGATE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def load(monkeypatch, **env) -> Settings:
    for k, v in env.items():
        monkeypatch.setenv(f"RISKGATE_{k.upper()}", str(v))
    return load_settings()


def error(monkeypatch, **env) -> str:
    with pytest.raises(SettingsError) as exc:
        load(monkeypatch, **env)
    return str(exc.value)


def test_defaults_follow_the_spec(monkeypatch):
    s = load(monkeypatch)
    assert (s.window, s.buckets, s.recompute_interval, s.heartbeat, s.min_slates) == (86400, 24, 10, 60, 100)
    assert (s.grid_min, s.grid_max, s.grid_size, s.grid_values) == (0.0, 1.0, 1001, None)
    assert (s.history_max, s.guarantee, s.loss, s.security_protocol) == (500, "expectation", "fraction", "PLAINTEXT")
    assert set(s.strategies) == {"remove", "replace"}
    assert all(0 < a < 1 for a in s.alphas)


def test_comma_lists_parse_from_plain_strings(monkeypatch):
    s = load(monkeypatch, alphas="0.1, 0.05", strategies="replace", grid_values="0.5,0.1,0.9")
    assert s.alphas == (0.05, 0.1)
    assert s.strategies == ("replace",)
    assert sorted(s.grid_values) == [0.1, 0.5, 0.9]


def test_scalars_parse_from_env(monkeypatch):
    s = load(monkeypatch, broker="kafka://k1:9092,kafka://k2:9093", app_id="rg", window="3600", buckets="12",
             guarantee="high_probability", delta="0.05", loss="per_slot", beta="30", web_port="7001",
             topic_partitions="3")
    assert s.bootstrap == "k1:9092,k2:9093"
    assert (s.app_id, s.window, s.buckets, s.guarantee, s.delta, s.loss, s.beta, s.web_port, s.topic_partitions) == (
        "rg", 3600, 12, "high_probability", 0.05, "per_slot", 30, 7001, 3)


def test_the_per_user_bounds_reach_the_engine(monkeypatch):
    from streams.app import engine_config

    lim = engine_config(load(monkeypatch, history_max="40", pending_max="30", safe_pool_max="20",
                             user_window_max="10", beta="60")).limits
    assert (lim.history_max, lim.pending_max, lim.safe_pool_max, lim.user_window_max, lim.beta) == (40, 30, 20, 10, 60)
    from calibration.user_state import Limits

    assert Settings.model_fields["user_window_max"].default == Limits().user_window_max  # one default, two places


def test_settings_are_immutable(monkeypatch):
    s = load(monkeypatch)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        s.alphas = (0.2,)


def test_a_bad_alpha_names_the_variable(monkeypatch):
    msg = error(monkeypatch, alphas="0.05,1.5")
    assert msg.startswith("RISKGATE_ALPHAS: 1.5 is not in (0, 1)")


@pytest.mark.parametrize("env, variable", [
    ({"alphas": "abc"}, "RISKGATE_ALPHAS"),
    ({"alphas": ""}, "RISKGATE_ALPHAS"),
    ({"alphas": "nan"}, "RISKGATE_ALPHAS"),
    ({"strategies": "remove,drop"}, "RISKGATE_STRATEGIES"),
    ({"guarantee": "always"}, "RISKGATE_GUARANTEE"),
    ({"delta": "1"}, "RISKGATE_DELTA"),
    ({"delta": "0"}, "RISKGATE_DELTA"),
    ({"loss": "squared"}, "RISKGATE_LOSS"),
    ({"window": "-1"}, "RISKGATE_WINDOW"),
    ({"window": "inf"}, "RISKGATE_WINDOW"),
    ({"buckets": "0"}, "RISKGATE_BUCKETS"),
    ({"buckets": "2.5"}, "RISKGATE_BUCKETS"),
    ({"label_window": "0"}, "RISKGATE_LABEL_WINDOW"),
    ({"allowed_lateness": "-3"}, "RISKGATE_ALLOWED_LATENESS"),
    ({"recompute_interval": "0"}, "RISKGATE_RECOMPUTE_INTERVAL"),
    ({"beta": "-1"}, "RISKGATE_BETA"),
    ({"beta": "101"}, "RISKGATE_BETA"),
    ({"beta": "nan"}, "RISKGATE_BETA"),
    ({"min_slates": "0"}, "RISKGATE_MIN_SLATES"),
    ({"grid_max": "inf"}, "RISKGATE_GRID_MAX"),
    ({"grid_min": "nan"}, "RISKGATE_GRID_MIN"),
    ({"grid_size": "0"}, "RISKGATE_GRID_SIZE"),
    ({"grid_values": "0.1,x"}, "RISKGATE_GRID_VALUES"),
    ({"grid_values": "0.1,inf"}, "RISKGATE_GRID_VALUES"),
    ({"topic_partitions": "0"}, "RISKGATE_TOPIC_PARTITIONS"),
    ({"web_port": "70000"}, "RISKGATE_WEB_PORT"),
    ({"web_port": "0"}, "RISKGATE_WEB_PORT"),  # Faust refuses port 0: fail at start, by name
    ({"history_max": "0"}, "RISKGATE_HISTORY_MAX"),
    ({"user_window_max": "0"}, "RISKGATE_USER_WINDOW_MAX"),
    ({"max_items": "-5"}, "RISKGATE_MAX_ITEMS"),
    ({"safe_pool_max": "-1"}, "RISKGATE_SAFE_POOL_MAX"),
    ({"broker": "localhost:9092"}, "RISKGATE_BROKER"),
    ({"broker": "kafka://a:1,b"}, "RISKGATE_BROKER"),
    ({"security_protocol": "TLS"}, "RISKGATE_SECURITY_PROTOCOL"),
    ({"sasl_mechanism": "GSSAPI"}, "RISKGATE_SASL_MECHANISM"),
])
def test_every_bad_value_names_its_variable(monkeypatch, env, variable):
    assert variable in error(monkeypatch, **env)


def test_all_bad_variables_are_named_at_once(monkeypatch):
    msg = error(monkeypatch, alphas="2", delta="5", loss="x")
    for name in ("RISKGATE_ALPHAS", "RISKGATE_DELTA", "RISKGATE_LOSS"):
        assert name in msg


@pytest.mark.parametrize("env, variables", [
    ({"heartbeat": "5", "recompute_interval": "10"}, ("RISKGATE_HEARTBEAT", "RISKGATE_RECOMPUTE_INTERVAL")),
    ({"grid_min": "0.5", "grid_max": "0.5"}, ("RISKGATE_GRID_MAX", "RISKGATE_GRID_MIN")),
    ({"window": "10", "buckets": "100"}, ("RISKGATE_WINDOW", "RISKGATE_BUCKETS")),
    ({"security_protocol": "SASL_PLAINTEXT"}, ("RISKGATE_SASL_USERNAME", "RISKGATE_SASL_PASSWORD")),
])
def test_cross_field_rules_name_their_variables(monkeypatch, env, variables):
    msg = error(monkeypatch, **env)
    assert all(v in msg for v in variables), msg


def test_an_explicit_grid_ignores_the_bounds(monkeypatch):
    s = load(monkeypatch, grid_values="0.2,0.4", grid_min="1", grid_max="0")
    assert s.grid_values == (0.2, 0.4)


def test_beta_may_be_switched_off(monkeypatch):
    assert load(monkeypatch, beta="none").beta is None


def test_env_file_supplies_defaults_and_the_environment_wins(monkeypatch, tmp_path):
    f = tmp_path / "riskgate.env"
    f.write_text("RISKGATE_ALPHAS=0.2,0.3\nRISKGATE_APP_ID=from-file\n")
    s = load(monkeypatch, config=f, app_id="from-env")
    assert s.alphas == (0.2, 0.3) and s.app_id == "from-env"


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_toml_and_json_config_files(monkeypatch, tmp_path, suffix):
    f = tmp_path / f"riskgate{suffix}"
    if suffix == ".toml":
        f.write_text('alphas = [0.2, 0.3]\napp_id = "from-file"\nwindow = 7200\nstrategies = "replace"\n')
    else:
        f.write_text(json.dumps({"ALPHAS": "0.2,0.3", "app_id": "from-file", "window": 7200,
                                 "strategies": ["replace"]}))
    s = load(monkeypatch, config=f, window="3600")
    assert (s.alphas, s.app_id, s.window, s.strategies) == ((0.2, 0.3), "from-file", 3600, ("replace",))


def test_bad_value_in_a_config_file_names_variable_and_file(monkeypatch, tmp_path):
    f = tmp_path / "riskgate.toml"
    f.write_text("delta = 3\n")
    msg = error(monkeypatch, config=f)
    assert "RISKGATE_DELTA" in msg and str(f) in msg


def test_unknown_keys_in_a_config_file_are_errors(monkeypatch, tmp_path):
    f = tmp_path / "riskgate.json"
    f.write_text(json.dumps({"alpah": 0.1}))
    assert "alpah" in error(monkeypatch, config=f)


def test_a_retired_setting_in_a_config_file_is_ignored_with_a_warning(monkeypatch, tmp_path, caplog):
    """RISKGATE_HOLDOUT_SHARE did nothing and is gone; a file naming it must not stop an upgraded worker."""
    f = tmp_path / "riskgate.toml"
    f.write_text("holdout_share = 0.05\nwindow = 7200\n")
    s = load(monkeypatch, config=f)
    assert s.window == 7200 and not hasattr(s, "holdout_share")
    assert "'holdout_share'" in caplog.text and "no longer a setting" in caplog.text


def test_missing_config_file(monkeypatch, tmp_path):
    assert "RISKGATE_CONFIG" in error(monkeypatch, config=tmp_path / "nope.env")


def test_secrets_stay_out_of_repr(monkeypatch):
    s = load(monkeypatch, security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", sasl_username="svc",
             sasl_password="hunter2", web_token="tok-secret")
    assert "hunter2" not in repr(s) and "tok-secret" not in repr(s)
    assert s.sasl_password.get_secret_value() == "hunter2"


def test_no_credentials_for_plaintext(monkeypatch):
    s = load(monkeypatch)
    assert s.broker_credentials() is None and s.kafka_kwargs() == {}


def test_sasl_credentials_for_faust_and_aiokafka(monkeypatch):
    import faust
    from faust.types.auth import AuthProtocol, SASLMechanism

    s = load(monkeypatch, security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
             sasl_password="pw")
    creds = s.broker_credentials()
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism) == ("svc", "pw", SASLMechanism.SCRAM_SHA_512)
    assert creds.protocol == AuthProtocol.SASL_PLAINTEXT
    kw = s.kafka_kwargs()
    assert (kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_password"]) == (
        "SASL_PLAINTEXT", "SCRAM-SHA-512", "pw")


def test_sasl_over_tls_carries_a_context(monkeypatch):
    s = load(monkeypatch, security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="svc",
             sasl_password="pw")
    from faust.types.auth import AuthProtocol

    creds = s.broker_credentials()
    assert creds.protocol == AuthProtocol.SASL_SSL and isinstance(creds.ssl_context, ssl.SSLContext)


def test_ssl_credentials(monkeypatch):
    import faust

    creds = load(monkeypatch, security_protocol="SSL").broker_credentials()
    assert isinstance(creds, faust.SSLCredentials) and isinstance(creds.context, ssl.SSLContext)


def test_unreadable_tls_files_fail_at_start_naming_the_variable(monkeypatch, tmp_path):
    msg = error(monkeypatch, security_protocol="SSL", ssl_cafile=tmp_path / "missing-ca.pem")
    assert "RISKGATE_SSL_CAFILE" in msg


def test_tls_files_that_are_not_pem_fail_at_start_naming_the_variable(monkeypatch, tmp_path):
    """The k8s Secret template's placeholder CA stopped the worker later, with ssl.SSLError and a traceback."""
    placeholder = tmp_path / "ca.crt"
    placeholder.write_text("-----BEGIN CERTIFICATE-----\nCHANGE-ME\n-----END CERTIFICATE-----\n")
    msg = error(monkeypatch, security_protocol="SASL_SSL", sasl_username="u", sasl_password="p",
                ssl_cafile=placeholder)
    assert "RISKGATE_SSL_CAFILE" in msg and "no CA certificate in PEM form" in msg
    monkeypatch.delenv("RISKGATE_SSL_CAFILE")
    junk = tmp_path / "client.crt"
    junk.write_text("not a certificate")
    msg = error(monkeypatch, security_protocol="SSL", ssl_certfile=junk, ssl_keyfile=junk)
    assert "RISKGATE_SSL_CERTFILE" in msg and "RISKGATE_SSL_KEYFILE" in msg
