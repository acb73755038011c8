"""One typed settings object for a worker, read from ``RISKGATE_*`` environment variables.

Every field below is ``RISKGATE_<NAME>`` in the environment (e.g. ``alphas`` is
``RISKGATE_ALPHAS=0.05,0.1``). A file can supply defaults: ``RISKGATE_CONFIG``
names a ``.toml`` or ``.json`` file of ``name = value`` pairs (names with or
without the ``RISKGATE_`` prefix, any case; lists as arrays or comma strings),
or any other file as ``.env``-style ``RISKGATE_NAME=value`` lines. The
environment wins over the file. Lists are plain comma-separated strings.
Numbers must be finite. A bad value fails at start with the variable's name:
``load_settings`` raises :class:`SettingsError`, e.g.
``RISKGATE_ALPHAS: 1.5 is not in (0, 1)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "SettingsError", "load_settings", "ENV_PREFIX"]

ENV_PREFIX = "RISKGATE_"

log = logging.getLogger("riskgate.settings")


class SettingsError(ValueError):
    """Bad configuration; the message names every offending variable."""


def _split(v):
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",") if x.strip())
    return v


class Settings(BaseSettings):
    # allow_inf_nan=False: "inf"/"nan" in a float variable is a typo, never a setting.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, allow_inf_nan=False)

    # Kafka and the app
    broker: str = "kafka://127.0.0.1:9092"
    app_id: str = "riskgate"
    data_dir: Path = Path("./.riskgate/data")
    topic_prefix: str = Field("", max_length=100, pattern=r"^[A-Za-z0-9._-]*$")
    topic_partitions: int = Field(8, ge=1, le=10_000)
    topic_replication_factor: int = Field(1, ge=1)
    rebalance_timeout: float = Field(10.0, gt=0)
    # Broker quirks: see docs/operations.md ("tansu"). One-record producer batches
    # make tansu's reported end offsets exact, which table recovery relies on.
    recovery_consistency_check: bool = True
    producer_max_batch_size: int = Field(512 * 1024, ge=1)  # bytes per partition batch; users are KBs each
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=1, le=65535)
    web_token: SecretStr | None = Field(None, min_length=1)  # unset: the user views are closed

    # calibration (SPEC §4–6)
    alphas: Annotated[tuple[float, ...], NoDecode] = (0.05, 0.1, 0.2)
    strategies: Annotated[tuple[Literal["remove", "replace"], ...], NoDecode] = ("remove", "replace")
    guarantee: Literal["expectation", "high_probability"] = "expectation"
    delta: float = 0.1
    loss: Literal["fraction", "per_slot"] = "fraction"
    label_window: float = Field(3600.0, gt=0)
    allowed_lateness: float = Field(60.0, ge=0)
    window: float = Field(86_400.0, gt=0)
    buckets: int = Field(24, ge=1, le=10_000)
    recompute_interval: float = Field(10.0, gt=0)
    heartbeat: float = Field(60.0, gt=0)
    beta: Annotated[float | None, NoDecode] = 50.0
    min_slates: int = Field(100, ge=1)
    grid_min: float = 0.0
    grid_max: float = 1.0
    grid_size: int = Field(1001, ge=1, le=1_000_000)
    grid_values: Annotated[tuple[float, ...] | None, NoDecode] = None

    # bounds (SPEC §3) and throughput
    history_max: int = Field(500, ge=1)
    pending_max: int = Field(2000, ge=1)
    # Mature holdout slates kept per user for their own `user:<id>` λ̂ (SPEC §5); with the
    # 24 h window these are most of a heavy user's memory (~0.5 kB a slate of 20 items).
    user_window_max: int = Field(1000, ge=1)
    safe_pool_max: int = Field(100, ge=0)
    max_items: int = Field(200, ge=1)
    user_cache: int = Field(100_000, ge=1)
    batch_max: int = Field(5000, ge=1)  # most input records per call of the batch callback
    # Changed users are written (one changelog record each) and their records
    # acked every FLUSH_INTERVAL seconds or FLUSH_MAX_EVENTS records, whichever
    # comes first: a user with many events in that time is written once. A crash
    # re-reads at most what was not flushed (at-least-once, idempotent folding).
    flush_interval: float = Field(1.0, gt=0)
    # How long a starting worker asks the broker for the topics' partition counts before it
    # stops with status 1 (a broker starting beside it gets this long; Faust would stop at once).
    broker_wait: float = Field(30.0, ge=0)
    # An event stamped further than this past the worker's clock is dead-lettered
    # (future_ts): one such event would drag its partition's watermark forward and
    # make everything after it late.
    max_future_skew: float = Field(86_400.0, gt=0)
    # RocksDB memory, per database (one per table and partition: 3 tables × partitions).
    # Faust's defaults are 3 × 64 MB write buffers and a 2 GB block cache *each*.
    rocksdb_write_buffer_mb: int = Field(8, ge=1)
    rocksdb_block_cache_mb: int = Field(16, ge=1)
    flush_max_events: int = Field(50_000, ge=1)
    # Flushes send every change to the changelog (the durable copy) at once; the local
    # RocksDB gets a cached user's changes when it is evicted, before a revoke or stop,
    # and at least this often (a restart on the same data directory replays the
    # changelog since the last of these).
    local_sync_interval: float = Field(60.0, gt=0)
    # A user's safe-pools record is re-sent at the flush that changed it when an item
    # of the pool last sent is no longer safe as sent (flagged, blocked, evicted,
    # re-ranked) or anything else of theirs changed; a
    # pool that only gained items waits for the next round of additions, at most this
    # long (a heavy user's many additions then cost one record).
    pool_additions_interval: float = Field(5.0, ge=0)

    # Kafka security
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: FilePath | None = None  # must exist: a missing CA file fails at start, not at first connect
    ssl_certfile: FilePath | None = None
    ssl_keyfile: FilePath | None = None

    @field_validator("alphas", "strategies", "grid_values", mode="before")
    @classmethod
    def _comma_list(cls, v):
        return _split(v)

    @field_validator("beta", mode="before")
    @classmethod
    def _beta(cls, v):
        if isinstance(v, str) and v.strip().lower() in ("none", ""):
            return None
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v):
        if not v:
            raise ValueError("at least one alpha is needed")
        for a in v:
            if not (0.0 < a < 1.0):
                raise ValueError(f"{a} is not in (0, 1)")
        return tuple(sorted(set(v)))

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, v):
        if not v:
            raise ValueError("at least one strategy is needed")
        return tuple(dict.fromkeys(v))

    @field_validator("delta")
    @classmethod
    def _delta(cls, v):
        if not (0.0 < v < 1.0):
            raise ValueError(f"{v} is not in (0, 1)")
        return v

    @field_validator("beta")
    @classmethod
    def _beta_range(cls, v):
        if v is not None and not (math.isfinite(v) and 0 <= v <= 100):
            raise ValueError(f"{v} must be a watch percentage in [0, 100], or 'none'")
        return v

    @field_validator("broker")
    @classmethod
    def _broker(cls, v):
        for url in v.split(","):
            url = url.strip()
            if not url.startswith("kafka://") or ":" not in url.removeprefix("kafka://"):
                raise ValueError(f"{url!r} is not kafka://host:port")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        # Rules across fields: the messages name the variables, since the
        # error has no single field to point at.
        p = ENV_PREFIX
        if self.grid_values is None and self.grid_size > 1 and not self.grid_max > self.grid_min:
            raise ValueError(f"{p}GRID_MAX ({self.grid_max}) must exceed {p}GRID_MIN ({self.grid_min})")
        if self.grid_values is not None:
            from calibration.grid import make_grid

            try:
                make_grid(values=self.grid_values)
            except ValueError as e:
                raise ValueError(f"{p}GRID_VALUES: {e}") from None
        if self.heartbeat < self.recompute_interval:
            raise ValueError(f"{p}HEARTBEAT ({self.heartbeat}) must be at least "
                             f"{p}RECOMPUTE_INTERVAL ({self.recompute_interval})")
        if self.window / self.buckets < 1.0:
            raise ValueError(f"{p}WINDOW / {p}BUCKETS must give buckets of at least 1 s "
                             f"(got {self.window} / {self.buckets})")
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"{p}SECURITY_PROTOCOL={self.security_protocol} needs {p}SASL_USERNAME "
                             f"and {p}SASL_PASSWORD")
        if self.security_protocol.endswith("SSL"):
            # The files are read now: a CA that is not PEM (the k8s Secret template's placeholder)
            # stopped the worker later with ssl.SSLError "[X509] PEM lib" and a traceback.
            try:
                ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"{p}SSL_CAFILE ({self.ssl_cafile}) holds no CA certificate in PEM form ({e})") from None
            if self.ssl_certfile:
                try:
                    self.ssl_context()
                except (ssl.SSLError, OSError) as e:
                    raise ValueError(f"{p}SSL_CERTFILE ({self.ssl_certfile}) and {p}SSL_KEYFILE "
                                     f"({self.ssl_keyfile}) are not a PEM certificate and its key ({e})") from None
        return self

    @property
    def bootstrap(self) -> str:
        return ",".join(u.strip().removeprefix("kafka://") for u in self.broker.split(","))

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.security_protocol.endswith("SSL"):
            return None
        ctx = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        if self.ssl_certfile:
            ctx.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile) if self.ssl_keyfile else None)
        return ctx

    def broker_credentials(self):
        """Faust credentials for the configured security protocol (None for PLAINTEXT)."""
        import faust

        if self.security_protocol == "PLAINTEXT":
            return None
        if self.security_protocol == "SSL":
            return faust.SSLCredentials(self.ssl_context())
        mechanism = self.sasl_mechanism
        password = self.sasl_password.get_secret_value()
        if mechanism == "PLAIN":
            return faust.SASLCredentials(username=self.sasl_username, password=password, ssl_context=self.ssl_context())
        from faust.auth import SASLCredentials
        from faust.types.auth import SASLMechanism

        return SASLCredentials(username=self.sasl_username, password=password,
                               mechanism=SASLMechanism(mechanism), ssl_context=self.ssl_context())

    def kafka_kwargs(self) -> dict:
        """The same security settings for plain aiokafka clients (the ranker, the producer)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        kw = {"security_protocol": self.security_protocol, "ssl_context": self.ssl_context()}
        if self.security_protocol.startswith("SASL"):
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password.get_secret_value())
        return kw


def _env_name(loc) -> str:
    field = str(loc[0]) if loc else ""
    return f"{ENV_PREFIX}{field.upper()}" if field else "settings"


def _file_values(path: Path) -> dict | None:
    """The ``name -> value`` pairs of a TOML/JSON config file (None for a .env file).

    Names may carry the ``RISKGATE_`` prefix and any case; an unknown name is
    an error (a typo in a file would otherwise silently keep the default).
    """
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        return None
    try:
        data = tomllib.loads(path.read_text()) if suffix == ".toml" else json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SettingsError(f"{ENV_PREFIX}CONFIG: cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{ENV_PREFIX}CONFIG: {str(path)!r} must hold a table of settings")
    out = {}
    for name, value in data.items():
        field = str(name).lower().removeprefix(ENV_PREFIX.lower())
        if field in RETIRED:  # (an upgrade must not stop a worker over a setting that did nothing)
            log.warning("%sCONFIG: %r in %r is no longer a setting (%s); ignored", ENV_PREFIX, name, str(path),
                        RETIRED[field])
            continue
        if field not in Settings.model_fields:
            raise SettingsError(f"{ENV_PREFIX}CONFIG: unknown setting {name!r} in {str(path)!r}")
        out[field] = value
    return out


#: Settings that existed and are gone, with why: a config file naming one is read with a warning.
RETIRED = {"holdout_share": "the worker never read it; the example ranker's --holdout-share sets the share"}


def load_settings(**overrides) -> Settings:
    """Read settings (env, then ``RISKGATE_CONFIG`` file); raise :class:`SettingsError` naming bad variables.

    ``overrides`` (field names) win over both; the CLI and tests use them.
    """
    config = os.environ.get(f"{ENV_PREFIX}CONFIG")
    env_file, from_file = None, {}
    if config:
        path = Path(config)
        if not path.is_file():
            raise SettingsError(f"{ENV_PREFIX}CONFIG: no such file {config!r}")
        values = _file_values(path)
        if values is None:
            env_file = config
        else:  # init values beat the environment in pydantic-settings: keep only what the env does not set
            env = {k.upper() for k in os.environ}
            from_file = {k: v for k, v in values.items() if f"{ENV_PREFIX}{k.upper()}" not in env}
    try:
        return Settings(_env_file=env_file, **{**from_file, **overrides})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                where = f" (from {config})" if err["loc"][0] in from_file else ""
                problems.append(f"{_env_name(err['loc'])}: {msg} (got {err.get('input')!r}){where}")
            else:
                problems.append(msg)
        raise SettingsError("; ".join(problems)) from None
