"""The one settings model: CLI flags over environment over TOML file over defaults."""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from yarl import URL

from agent_sidecar import paths
from agent_sidecar.snapshot import CODERD_MAX_BODY_BYTES, MIN_SNAPSHOT_BYTES

ENV_PREFIX = "AGENT_SIDECAR_"
CONFIG_ENV = paths.CONFIG_ENV
SECRET_MASK = "**********"  # noqa: S105 - what a secret is shown as

# Which setting names the Coder agent's own variables feed. They are a contract with
# deployment docs, so they are spelled out here once and nowhere else.
_CODER_ALIASES: dict[str, tuple[str, ...]] = {
    "coder_url": ("CODER_AGENT_URL",),
    "coder_token": ("CODER_AGENT_TOKEN",),
    "coder_token_file": ("CODER_AGENT_TOKEN_FILE",),
}


class ConfigError(Exception):
    """The configuration is invalid; the message is one line per problem, fit for a person."""


def env_names(name: str) -> tuple[str, ...]:
    """The environment variables that set a field, in the order they are consulted."""
    return (ENV_PREFIX + name.upper(), *_CODER_ALIASES.get(name, ()))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def from_env(name: str) -> tuple[str, str] | None:
    """The variable that sets a field and its value: the first of `env_names(name)` that is
    set and not empty, spelled exactly so. The settings and `load`'s report of where each
    value came from both ask this, so the report always names what the user set."""
    for env in env_names(name):
        value = os.environ.get(env)
        if value:
            return env, value
    return None


# What a valid agent token looks like, for error messages (a description, not a secret).
TOKEN_FORM = "printable ASCII, like the UUID the Coder agent provides; spaces, tabs and line ends around it are ignored"  # noqa: E501, S105
# Only ASCII whitespace is dropped around a token: str.strip() would also drop \x1c-\x1f,
# \x85 and NBSP, which no token holds, silently, where they must be refused.
_ASCII_WHITESPACE = " \t\n\r\x0b\x0c"


def normalise_token(raw: str) -> str:
    """The agent token as it goes into a header: ASCII whitespace around it stripped.
    Raises ValueError, naming the valid form and never the value, when it is empty or holds
    anything but printable ASCII (a control character, a tab, CR or LF included, or anything
    outside ASCII). The environment's token and the file's go through this."""
    token = raw.strip(_ASCII_WHITESPACE)
    if not token:
        raise ValueError(f"is empty; expected {TOKEN_FORM}")
    for char in token:
        if not " " <= char <= "~":
            what = "a control character" if char < " " or "\x7f" <= char <= "\x9f" else (
                "a character outside ASCII")
            raise ValueError(f"holds {what} (U+{ord(char):04X}), which no agent token has; "
                             f"expected {TOKEN_FORM}")
    return token


def _http_url(value: str, example: str) -> str:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"must be an http(s) URL with a host, like {example}")
    return value


# What `metrics_addr` looks like, for its errors.
HOSTPORT_FORM = ("HOST:PORT, like 127.0.0.1:9464 or [::1]:9464 (an IPv6 address in brackets, "
                 "a port 1-65535 in ASCII digits)")
# A host name or an IPv4 address: what getaddrinfo is asked, with nothing it would read as
# something else (a scheme, a path, a space, a character outside ASCII).
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")


def parse_hostport(value: str) -> tuple[str, int]:
    """The host (an IPv6 address without its brackets) and port of a `metrics_addr`.
    Raises ValueError naming the problem and HOSTPORT_FORM. Everything `run` would refuse
    for its form is refused here, so that `config` refuses it too: what is left to `run` is
    what depends on the machine (a name that does not resolve, a port in use)."""
    def bad(problem: str) -> ValueError:
        return ValueError(f"{problem}; expected {HOSTPORT_FORM}")

    if "://" in value:
        raise bad("has a URL scheme")
    if any(c.isspace() for c in value):
        raise bad("holds whitespace")
    if not value.isascii():
        raise bad("holds a character outside ASCII")
    if "/" in value:
        raise bad("has a path")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise bad("has no HOST: part" if sep else "has no :PORT")
    # str.isdigit() alone would take other scripts' digits, which int() reads as ASCII ones.
    if not (port.isascii() and port.isdigit()):
        raise bad("has a PORT that is not ASCII digits")
    if not 0 < int(port) < 65536:
        raise bad("has a port outside 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise bad("has no IPv6 address in its brackets") from None
        return host[1:-1], int(port)
    if ":" in host:
        raise bad("has an IPv6 address without brackets")
    if not _HOST_NAME.fullmatch(host):
        raise bad("has a host that is neither a name nor an IPv4 address")
    return host, int(port)


def _default_socket() -> Path:
    return Path(paths.default_socket_path())


# The file values for the load in progress. A context variable rather than a class
# attribute so that concurrent loads (tests) never see each other's file.
_file_values: ContextVar[Mapping[str, Any] | None] = ContextVar("_file_values", default=None)


class _EnvSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        found = from_env(field_name)
        return (found[1] if found else None), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {name: found[1] for name in self.settings_cls.model_fields
                if (found := from_env(name))}


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_file_values.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_values.get() or {})


class Settings(BaseSettings):
    """Every knob of agent-sidecar. Names carry their units; each is also an env var."""

    # The environment is read by _EnvSource: exactly the names env_names() documents, so
    # the light client (paths.py, AGENT_SIDECAR_SOCKET) reads the same variable by the same
    # rule, and no other spelling (another case, a bare field name) is quietly accepted.
    # allow_inf_nan=False: every float here is a duration or a bound, which "nan" or "inf"
    # never is; without it NaN fails the range check with a misleading "less than" message.
    model_config = SettingsConfigDict(
        extra="forbid",
        hide_input_in_errors=True,
        frozen=True,
        allow_inf_nan=False,
    )

    agentapi_url: str = Field(
        "http://localhost:3284",
        description="agentapi base URL",
    )
    coder_url: str | None = Field(
        None,
        description="Coder access URL; unset means no uploads",
    )
    coder_token: SecretStr | None = Field(
        None,
        description="Coder agent token (never accepted as a flag)",
    )
    coder_token_file: Path | None = Field(
        None,
        description="file holding the agent token; re-read when it changes, wins over the token",
    )
    task_id: uuid.UUID | None = Field(
        None,
        description="Coder task id (a UUID); unset means no uploads",
    )
    max_snapshot_bytes: int = Field(
        CODERD_MAX_BODY_BYTES,
        ge=MIN_SNAPSHOT_BYTES,
        le=CODERD_MAX_BODY_BYTES,
        description=f"cap on the encoded snapshot body, "
        f"{MIN_SNAPSHOT_BYTES}..{CODERD_MAX_BODY_BYTES}",
    )
    sink_dir: Path | None = Field(
        None,
        description="directory where each snapshot is also written as <task-id or local>.json",
    )
    socket: Path = Field(
        default_factory=_default_socket,
        description="relay Unix socket path",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="auto (console on a TTY, else JSON lines), json or console",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error"
    )
    settle_s: float = Field(
        0.5, ge=0, le=60,
        description="upload this long after a change once the agent is stable",
    )
    max_staleness_s: float = Field(
        10, gt=0, le=3600,
        description="while the agent runs, upload no later than this after the first unsent change",
    )
    shutdown_timeout_s: float = Field(
        8, gt=0, le=300,
        description="the whole shutdown, final upload included, finishes within this",
    )
    upload_timeout_s: float = Field(
        10, gt=0, le=300,
        description="timeout of one upload attempt",
    )
    retry_initial_s: float = Field(
        1, gt=0, le=3600,
        description="first upload retry back-off (exponential, full jitter)",
    )
    retry_max_s: float = Field(
        60, gt=0, le=3600,
        description="cap on the upload retry back-off and on Retry-After",
    )
    rejected_backoff_s: float = Field(
        300, gt=0, le=86400,
        description="wait after coderd rejects the token (401) or the task (404)",
    )
    reconnect_initial_s: float = Field(
        0.5, gt=0, le=600,
        description="first agentapi reconnect back-off",
    )
    reconnect_max_s: float = Field(
        10, gt=0, le=600,
        description="cap on the agentapi reconnect back-off",
    )
    poll_interval_s: float = Field(
        1, gt=0, le=600,
        description="polling period when agentapi has no /events",
    )
    # One agentapi message is at most one screen: about 80 000 characters (the registry
    # module runs --term-width 67 --term-height 1190), so at most ~0.5 MB even if every
    # character were JSON-escaped as \uXXXX. Parsing one holds about 8 times its size
    # while its text has a character outside the BMP (str widens to 4 bytes a character),
    # so this cap is also what bounds the peak: see deploy/kubernetes-pod.yaml.
    max_event_bytes: int = Field(
        2 * 1024 * 1024, ge=65536,
        description="larger SSE events (or lines), and larger elements of GET /messages, "
        "from agentapi are dropped as they arrive; parsing one holds several times this",
    )
    # GET /messages is agentapi's whole history (about 400 full screens at 32 MiB, and
    # many more real turns). It is read element by element into what its reader keeps
    # (the model; send --reply, the messages from its input on), so no memory grows with
    # it: this cap bounds the bytes one read may take, not the peak.
    max_agentapi_response_bytes: int = Field(
        32 * 1024 * 1024, ge=65536,
        description="cap on one agentapi response body (GET /messages: the whole "
        "history), decompressed; a larger one is refused",
    )
    agentapi_timeout_s: float = Field(
        10, gt=0, le=300,
        description="timeout of one agentapi GET /status or /messages",
    )
    send_wait_s: float = Field(
        30, ge=0, le=3600,
        description="default wait for the agent to be stable before relaying input",
    )
    send_timeout_s: float = Field(
        60, gt=0, le=3600,
        description="bound on one agentapi POST /message once it is written",
    )
    acp_turn_timeout_s: float = Field(
        3600, gt=0, le=86400,
        description="under agentapi's ACP transport, where POST /message lasts the whole "
        "turn, the bound on it instead of send_timeout_s",
    )
    relay_max_connections: int = Field(
        256, ge=1, le=65536,
        description="relay connections open at once; at the cap the longest idle one is "
        "closed for a new one",
    )
    relay_header_timeout_s: float = Field(
        10, gt=0, le=300,
        description="a relay request's headers must be complete this long after its first byte",
    )
    relay_body_timeout_s: float = Field(
        10, gt=0, le=300,
        description="a relay request's body must be complete this long after its headers",
    )
    relay_idle_timeout_s: float = Field(
        30, gt=0, le=3600,
        description="a relay connection with no request for this long is closed",
    )
    metrics_addr: str | None = Field(
        None,
        description="also serve /metrics over TCP at HOST:PORT; unset means socket only",
    )
    metrics_max_connections: int = Field(
        16, ge=1, le=1024,
        description="connections to metrics_addr open at once; at the cap the longest idle "
        "one (else the oldest busy one) is closed for a new one, so a flood of the port "
        "holds at most this many descriptors",
    )
    unhealthy_after_s: float | None = Field(
        None, gt=0, le=86400,
        description="/healthz turns unhealthy once the oldest change coderd has not stored "
        "is older than this (uploads failing); unset: 2 x max_staleness_s + retry_max_s",
    )
    reupload_settle_s: float = Field(
        0.5, ge=0, le=60,
        description="after agentapi goes away, upload once more this much later, so the "
        "sidecar's snapshot overwrites the one the module's stop script just wrote",
    )
    reupload_min_interval_s: float = Field(
        30, ge=0, le=3600,
        description="at most one upload after agentapi went away per this many seconds",
    )
    max_coderd_response_bytes: int = Field(
        65536, ge=1024, le=16 * 1024 * 1024,
        description="read at most this much of a response from coderd (or a front), "
        "decompressed; the rest is not read",
    )
    max_token_file_bytes: int = Field(
        65536, ge=64, le=16 * 1024 * 1024,
        description="a token file larger than this is refused unread",
    )

    # Where each value came from (flag, env, file, default), as config.load() found it.
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvSource(settings_cls), _FileSource(settings_cls)

    @field_validator("agentapi_url")
    @classmethod
    def _check_agentapi_url(cls, value: str) -> str:
        return _http_url(value, "http://localhost:3284")

    @field_validator("coder_token")
    @classmethod
    def _check_coder_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        return SecretStr(normalise_token(value.get_secret_value()))

    @model_validator(mode="after")
    def _derive_unhealthy_after(self) -> Settings:
        if self.unhealthy_after_s is None:
            # Two missed staleness deadlines plus one full retry back-off: a healthy
            # uploader never leaves a change unstored that long (80 s at the defaults).
            derived = 2 * self.max_staleness_s + self.retry_max_s
            object.__setattr__(self, "unhealthy_after_s", derived)  # frozen: set once here
        return self

    def origin(self, name: str) -> str:
        """Where the value of `name` came from: "env X", "flag --x", "file F", "default"."""
        return self._origins.get(name, "default")

    @field_validator("coder_url")
    @classmethod
    def _check_coder_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return _http_url(value, "https://coder.example.com/")

    @field_validator("socket", mode="before")
    @classmethod
    def _check_socket(cls, value: object) -> object:
        # Path("") is ".", which run would then refuse as "not a socket": name the fault,
        # in the words the clients use for the same file (paths.py).
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"must be a path, like /run/user/1000/{paths.SOCKET_NAME}; "
                             "leave it out for the default")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _check_metrics_addr(cls, value: str | None) -> str | None:
        if not value:
            return None
        parse_hostport(value)
        return value

    @property
    def uploads_disabled_reason(self) -> str | None:
        """Why no snapshot can be uploaded, or None when uploads are on."""
        missing = [
            name
            for name, value, env in (
                ("Coder URL", self.coder_url, "CODER_AGENT_URL"),
                ("task id", self.task_id, "AGENT_SIDECAR_TASK_ID"),
            )
            if value is None
        ]
        if missing:
            return "no " + " and no ".join(missing) + " configured"
        if self.coder_token is None and self.coder_token_file is None:
            return "no agent token (CODER_AGENT_TOKEN or CODER_AGENT_TOKEN_FILE)"
        return None

    @property
    def sink_name(self) -> str:
        return f"{self.task_id}.json" if self.task_id else "local.json"


@dataclass(frozen=True)
class Loaded:
    """Settings plus where each value came from: flag, env, file or default."""

    settings: Settings
    origins: dict[str, str]
    config_file: Path | None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = paths.read_config_file(str(path))  # the clients' reading, so their words
    except paths.ConfigFileError as exc:
        raise ConfigError(str(exc)) from None
    if "coder_token" in data:
        raise ConfigError(
            f"config file {path}: coder_token is not accepted in a file; "
            "use CODER_AGENT_TOKEN or coder_token_file"
        )
    return data


def _describe(error: Mapping[str, Any], origins: Mapping[str, str]) -> str:
    field = str(error["loc"][0]) if error["loc"] else "?"
    if error["type"] == "extra_forbidden":
        valid = ", ".join(sorted(Settings.model_fields))
        return f"unknown setting {field!r} ({origins.get(field, 'file')}); valid settings: {valid}"
    info = Settings.model_fields.get(field)
    form = info.description if info and info.description else ""
    where = origins.get(field, "default")
    message = str(error["msg"]).removeprefix("Value error, ")
    if field == "task_id":
        message = "must be a UUID, like 0f3c9a52-7d1e-4b8a-9c63-2a5e8f1d4b70"
    if error["type"] == "finite_number":
        # pydantic's "Input should be a finite number" does not say what was wrong.
        message = "must be a finite number, not NaN or an infinity"
    if "expected" in message:  # the message names the valid form itself
        return f"invalid {field} (from {where}): {message}"
    return f"invalid {field} (from {where}): {message}; expected: {form}"


def load(flags: Mapping[str, Any] | None = None, *, config_file: Path | None = None) -> Loaded:
    """Build the settings from flags, os.environ and the file; raise ConfigError on any problem."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    file_values = _read_file(config_file) if config_file else {}

    origins: dict[str, str] = {}
    for name in [*Settings.model_fields, *file_values]:
        if name in flags:
            origins[name] = f"flag {flag_name(name)}"
        elif found := from_env(name):
            origins[name] = f"env {found[0]}"
        elif name in file_values:
            origins[name] = f"file {config_file}"
        else:
            origins[name] = "default"

    token = _file_values.set(file_values)
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(err, origins) for err in exc.errors())) from None
    finally:
        _file_values.reset(token)
    settings._origins = dict(origins)
    return Loaded(settings=settings, origins=origins, config_file=config_file)
