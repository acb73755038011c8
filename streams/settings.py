"""One typed settings object for a worker, read from ``RISKGATE_*`` environment variables.

Every field below is ``RISKGATE_<NAME>`` in the environment (e.g. ``alphas`` is
``RISKGATE_ALPHAS=0.05,0.1``). A file can supply defaults: ``RISKGATE_CONFIG``
names a ``.env``-style file of the same variables; the environment wins over it.
Lists are plain comma-separated strings. A bad value fails at start with the
variable's name: ``load_settings`` raises :class:`SettingsError`, e.g.
``RISKGATE_ALPHAS: 1.5 is not in (0, 1)``.
"""

from __future__ import annotations

import math
import os
import ssl
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "SettingsError", "load_settings", "ENV_PREFIX"]

ENV_PREFIX = "RISKGATE_"


class SettingsError(ValueError):
    """Bad configuration; the message names every offending variable."""


def _split(v):
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",") if x.strip())
    return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Kafka and the app
    broker: str = "kafka://127.0.0.1:9092"
    app_id: str = "riskgate"
    data_dir: Path = Path("./.riskgate/data")
    topic_partitions: int = Field(8, ge=1, le=10_000)
    topic_replication_factor: int = Field(1, ge=1)
    rebalance_timeout: float = Field(10.0, gt=0)
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=0, le=65535)
    web_token: SecretStr | None = None

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
    safe_pool_max: int = Field(100, ge=0)
    max_items: int = Field(200, ge=1)
    user_cache: int = Field(100_000, ge=1)
    batch_max: int = Field(2000, ge=1)
    batch_within: float = Field(0.05, gt=0)

    # Kafka security
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

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
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{v} must be a watch percentage >= 0, or 'none'")
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
        if not self.grid_max > self.grid_min and self.grid_values is None and self.grid_size > 1:
            raise ValueError("grid_max must exceed grid_min")
        if self.heartbeat < self.recompute_interval:
            raise ValueError("heartbeat must be at least recompute_interval")
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError("SASL needs sasl_username and sasl_password")
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


def load_settings(**overrides) -> Settings:
    """Read settings (env, then ``RISKGATE_CONFIG`` file); raise :class:`SettingsError` naming bad variables."""
    env_file = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if env_file and not Path(env_file).is_file():
        raise SettingsError(f"{ENV_PREFIX}CONFIG: no such file {env_file!r}")
    try:
        return Settings(_env_file=env_file, **overrides)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                problems.append(f"{_env_name(err['loc'])}: {msg} (got {err.get('input')!r})")
            else:
                problems.append(msg)
        raise SettingsError("; ".join(problems)) from None
