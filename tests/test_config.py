"""Settings: precedence, Coder's variable names, and errors that name the valid form."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent_sidecar import config
from agent_sidecar.config import ConfigError

from .sidecar import refusals

TASK = "0f3c9a52-7d1e-4b8a-9c63-2a5e8f1d4b70"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("AGENT_SIDECAR_", "CODER_")):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    """With nothing set, the documented defaults apply and uploads are off with a reason."""
    loaded = config.load()
    s = loaded.settings
    assert s.agentapi_url == "http://localhost:3284"
    assert s.max_snapshot_bytes == 65536
    assert (s.settle_s, s.max_staleness_s, s.shutdown_timeout_s) == (0.5, 10, 8)
    assert (s.upload_timeout_s, s.retry_max_s, s.send_wait_s) == (10, 60, 30)
    assert s.uploads_disabled_reason == "no Coder URL and no task id configured"
    assert set(loaded.origins.values()) == {"default"}


def test_socket_default_follows_xdg_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket lives in $XDG_RUNTIME_DIR when set, else in a per-uid directory in TMPDIR."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert config.load().settings.socket == Path("/run/user/1234/agent-sidecar.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("TMPDIR", raising=False)
    import os

    assert config.load().settings.socket == Path(
        f"/tmp/agent-sidecar-{os.getuid()}/agent-sidecar.sock")


def test_precedence_flag_env_file_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A flag beats the environment, which beats the file, which beats the default."""
    path = tmp_path / "c.toml"
    path.write_text("settle_s = 3\nmax_staleness_s = 4\nretry_max_s = 5\n")
    monkeypatch.setenv("AGENT_SIDECAR_SETTLE_S", "2")
    monkeypatch.setenv("AGENT_SIDECAR_MAX_STALENESS_S", "6")
    loaded = config.load({"settle_s": "1"}, config_file=path)
    s = loaded.settings
    assert (s.settle_s, s.max_staleness_s, s.retry_max_s, s.upload_timeout_s) == (1, 6, 5, 10)
    assert loaded.origins["settle_s"] == "flag --settle-s"
    assert loaded.origins["max_staleness_s"] == "env AGENT_SIDECAR_MAX_STALENESS_S"
    assert loaded.origins["retry_max_s"] == f"file {path}"
    assert loaded.origins["upload_timeout_s"] == "default"


def test_config_file_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AGENT_SIDECAR_CONFIG names the file when --config is not given."""
    path = tmp_path / "c.toml"
    path.write_text(f'task_id = "{TASK}"\n')
    monkeypatch.setenv("AGENT_SIDECAR_CONFIG", str(path))
    assert config.load().settings.task_id == uuid.UUID(TASK)


def test_coder_variable_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CODER_AGENT_URL, CODER_AGENT_TOKEN and CODER_AGENT_TOKEN_FILE feed the settings."""
    monkeypatch.setenv("CODER_AGENT_URL", "https://coder.example.com/")
    monkeypatch.setenv("CODER_AGENT_TOKEN", "secret-token-value")
    monkeypatch.setenv("CODER_AGENT_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("AGENT_SIDECAR_TASK_ID", TASK)
    s = config.load().settings
    assert s.coder_url == "https://coder.example.com/"
    assert s.coder_token is not None
    assert s.coder_token.get_secret_value() == "secret-token-value"
    assert "secret-token-value" not in repr(s)
    assert s.coder_token_file == tmp_path / "token"
    assert s.uploads_disabled_reason is None


def test_bare_field_names_are_not_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only prefixed variables count: an unrelated TASK_ID in the workspace is ignored."""
    monkeypatch.setenv("TASK_ID", "not-ours")
    monkeypatch.setenv("SETTLE_S", "9")
    s = config.load().settings
    assert s.task_id is None
    assert s.settle_s == 0.5


@pytest.mark.parametrize("env", ["agent_sidecar_settle_s", "AGENT_SIDECAR_settle_s",
                                 "Agent_Sidecar_Settle_S", "agent_sidecar_socket"])
def test_only_the_documented_spelling_is_read(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable is read by its documented name and case only; other spellings are ignored."""
    monkeypatch.setenv(env, "/x.sock" if env.endswith("socket") else "9")
    loaded = config.load()
    assert loaded.settings.settle_s == 0.5
    assert str(loaded.settings.socket) != "/x.sock"
    assert set(loaded.origins.values()) == {"default"}


def test_a_coder_variable_is_named_in_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """CODER_AGENT_URL=file:///x is refused in one line naming CODER_AGENT_URL as the source,
    with the expected form."""
    monkeypatch.setenv("CODER_AGENT_URL", "file:///x")
    with pytest.raises(ConfigError) as err:
        config.load()
    assert str(err.value) == (
        "invalid coder_url (from env CODER_AGENT_URL): must be an http(s) URL with a host, "
        "like https://coder.example.com/; expected: Coder access URL; unset means no uploads")


# Settings whose type takes any text, so that "bogus" is not an error for them.
_TAKES_ANY_TEXT = {"coder_token", "coder_token_file", "sink_dir", "socket"}


@pytest.mark.parametrize(("name", "env"), [
    (name, env) for name in config.Settings.model_fields if name not in _TAKES_ANY_TEXT
    for env in config.env_names(name)])
def test_every_error_names_the_variable_actually_set(
    name: str, env: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whichever of a setting's variables holds a bad value, the error names that variable."""
    monkeypatch.setenv(env, "bogus")
    with pytest.raises(ConfigError) as err:
        config.load()
    assert str(err.value).startswith(f"invalid {name} (from env {env}): ")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"task_id": "abc"}, "invalid task_id (from flag --task-id): must be a UUID"),
        ({"agentapi_url": "localhost:3284"}, "agentapi_url (from flag --agentapi-url): must be"
         " an http(s) URL with a host"),
        ({"coder_url": "coder.example.com"}, "invalid coder_url"),
        ({"max_snapshot_bytes": "100"}, "max_snapshot_bytes (from flag --max-snapshot-bytes):"
         " Input should be greater than or equal to 1024"),
        ({"log_format": "xml"}, "invalid log_format"),
        ({"metrics_addr": "9464"}, "has no :PORT; expected HOST:PORT"),
    ],
)
def test_bad_values_name_the_setting_and_the_valid_form(flags: dict[str, str], needle: str) -> None:
    """Each bad value gives one line naming the setting, where it came from, and the form."""
    with pytest.raises(ConfigError) as err:
        config.load(flags)
    assert needle in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_unknown_key_in_file(tmp_path: Path) -> None:
    """An unknown key in the file is an error that lists the valid keys."""
    path = tmp_path / "c.toml"
    path.write_text("settle_seconds = 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'settle_seconds'.*valid settings: "):
        config.load(config_file=path)


def test_token_is_refused_in_a_file(tmp_path: Path) -> None:
    """The token cannot be put in the config file, which is often world-readable."""
    path = tmp_path / "c.toml"
    path.write_text('coder_token = "x"\n')
    with pytest.raises(ConfigError, match="coder_token is not accepted in a file"):
        config.load(config_file=path)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    """A missing or malformed file is a clear error, not a traceback."""
    with pytest.raises(ConfigError, match="not found"):
        config.load(config_file=tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("settle_s = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(config_file=bad)


SECRET_ARG = "3f1c2a9e-7b4d-4e7a-9c1b-0123456789ab"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_sidecar", *args], capture_output=True, text=True,
        env=env, timeout=60, check=False,
    )


def test_cli_exits_2_with_one_line_on_bad_config(tmp_path: Path) -> None:
    """`run` with a bad task id stops before doing anything: exit 2, one clear line."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_SIDECAR_", "CODER_"))}
    env["AGENT_SIDECAR_SOCKET"] = str(tmp_path / "s.sock")
    proc = run_cli("run", "--task-id", "nope", env=env)
    assert proc.returncode == 2
    assert refusals(proc.stderr) == [
        "invalid task_id (from flag --task-id): must be a UUID, like "
        "0f3c9a52-7d1e-4b8a-9c63-2a5e8f1d4b70; expected: Coder task id (a UUID); unset means "
        "no uploads"
    ]
    assert not (tmp_path / "s.sock").exists()


def test_config_command_masks_the_token_and_shows_sources() -> None:
    """`agent-sidecar config` shows every setting's source and never the token."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_SIDECAR_", "CODER_"))}
    env["CODER_AGENT_TOKEN"] = "4b1c1d7e-0000-4000-8000-00000000beef"
    proc = run_cli("config", "--settle-s", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "4b1c1d7e" not in proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "**********" in lines["coder_token"]
    assert lines["coder_token"].endswith("env CODER_AGENT_TOKEN")
    assert lines["settle_s"].endswith("flag --settle-s")
    assert lines["retry_max_s"].endswith("default")


@pytest.mark.parametrize("as_json", [False, True])
def test_config_command_masks_url_userinfo(as_json: bool) -> None:
    """`agent-sidecar config` shows URLs with their `user:password@` masked, in both forms."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_SIDECAR_", "CODER_"))}
    env["CODER_AGENT_URL"] = "https://deploy:hunter2pass@coder.example.com/"
    env["AGENT_SIDECAR_AGENTAPI_URL"] = "http://agent:s3cret-pw@127.0.0.1:3284"
    proc = run_cli("config", *(["--json"] if as_json else []), env=env)
    assert proc.returncode == 0, proc.stderr
    for secret in ("hunter2pass", "deploy", "s3cret-pw", "agent:"):
        assert secret not in proc.stdout + proc.stderr
    assert "https://**********@coder.example.com/" in proc.stdout
    assert "http://**********@127.0.0.1:3284" in proc.stdout


def test_config_command_exits_2_when_invalid() -> None:
    """`agent-sidecar config` exits 2 on an invalid configuration, as `run` would."""
    proc = run_cli("config", "--settle-s", "-1")
    assert proc.returncode == 2
    assert "invalid settle_s" in proc.stderr


@pytest.mark.parametrize("args", [
    ("config", "--coder-token", SECRET_ARG),
    ("run", "--coder-tok", SECRET_ARG),
    ("run", f"--coder-token={SECRET_ARG}"),
    ("config", "--json", SECRET_ARG),
    ("check", "--socket", "/tmp/x", SECRET_ARG),
])
def test_a_token_typed_as_a_flag_is_refused_and_never_echoed(args: tuple[str, ...]) -> None:
    """A token passed as `--coder-token` (or any abbreviation, or a stray argument) is a
    usage error, exit 2, that names only the option and says where the token goes; the
    value appears in no output, and is never read as --coder-token-file."""
    proc = run_cli(*args, env={"CODER_AGENT_URL": "https://coder.example"})
    assert proc.returncode == 2, proc.stderr
    assert SECRET_ARG not in proc.stdout + proc.stderr
    assert "unrecognized arguments" in proc.stderr
    assert "coder_token_file" not in proc.stderr
    if "tok" in args[1]:
        assert "CODER_AGENT_TOKEN" in proc.stderr


@pytest.mark.parametrize("how", ["flag", 'socket = ""', "socket = 5", 'socket = ["a"]'])
def test_a_socket_that_is_not_a_path_is_refused_by_name(how: str, tmp_path: Path) -> None:
    """An empty or blank socket path (flag or file), or a file's socket that is not text,
    is refused as not a path, exit 2, in the clients' words, instead of being taken for
    "." and refused later as "not a socket", or in the settings library's words."""
    if how == "flag":
        proc = run_cli("config", "--socket", " ")
    else:
        (tmp_path / "c.toml").write_text(how + "\n")
        proc = run_cli("config", env={"AGENT_SIDECAR_CONFIG": str(tmp_path / "c.toml")})
    assert proc.returncode == 2, proc.stdout
    assert "invalid socket" in proc.stderr
    assert "must be a path" in proc.stderr


def test_help_names_each_setting_value_by_its_unit() -> None:
    """`run --help` shows a seconds setting's value as SECONDS, a byte cap's as BYTES and a
    count's (relay_max_connections) as COUNT, never a unit it does not have."""
    proc = run_cli("run", "--help")
    text = " ".join(proc.stdout.split())
    assert "--settle-s SECONDS" in text
    assert "--max-event-bytes BYTES" in text
    assert "--relay-max-connections COUNT" in text
    assert "--metrics-max-connections COUNT" in text


def test_help_lists_every_setting_but_the_token() -> None:
    """`run --help` documents each setting with its environment variable, and has no token flag."""
    proc = run_cli("run", "--help")
    assert proc.returncode == 0
    for name in config.Settings.model_fields:
        if name != "coder_token":
            assert config.flag_name(name) in proc.stdout
    assert "--coder-token " not in proc.stdout
    assert "AGENT_SIDECAR_SETTLE_S" in proc.stdout
    assert "CODER_AGENT_URL" in proc.stdout


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
@pytest.mark.parametrize("source", ["env", "flag", "file"])
def test_nan_and_infinities_are_refused_as_not_finite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str, source: str,
) -> None:
    """A NaN or an infinity in a float setting, from the environment, a flag or the TOML
    file, is refused with one line saying a finite number is required, not a range."""
    flags: dict[str, str] = {}
    path = None
    if source == "env":
        monkeypatch.setenv("AGENT_SIDECAR_SETTLE_S", value)
        where = "env AGENT_SIDECAR_SETTLE_S"
    elif source == "flag":
        flags["settle_s"] = value
        where = "flag --settle-s"
    else:
        # TOML spells them nan, inf, -inf only; the others are not TOML floats at all.
        toml = {"NaN": "nan", "Infinity": "+inf"}.get(value, value)
        path = tmp_path / "c.toml"
        path.write_text(f"settle_s = {toml}\n")
        where = f"file {path}"
    with pytest.raises(ConfigError) as err:
        config.load(flags, config_file=path)
    [line] = str(err.value).splitlines()
    assert line.startswith(f"invalid settle_s (from {where}): must be a finite number"), line
    assert "less than" not in line


@pytest.mark.parametrize(("value", "problem"), [
    ("http://127.0.0.1:9100", "has a URL scheme"),
    (" 127.0.0.1:9100", "holds whitespace"),
    ("127.0.0.1:9100 ", "holds whitespace"),
    ("127.0.0.1 :9100", "holds whitespace"),
    ("127.0.0.1:9100/metrics", "has a path"),
    ("127.0.0.1:\uff11\uff19\uff11\uff19\uff17", "holds a character outside ASCII"),
    ("127.0.0.1:\u0661\u0669\u0661", "holds a character outside ASCII"),
    ("::1:19193", "has an IPv6 address without brackets"),
    ("[nope]:19193", "has no IPv6 address in its brackets"),
    ("127.0.0.1:0", "has a port outside 1-65535"),
    ("127.0.0.1:65536", "has a port outside 1-65535"),
    ("127.0.0.1:", "has a PORT that is not ASCII digits"),
    ("127.0.0.1:-1", "has a PORT that is not ASCII digits"),
    (":9100", "has no HOST: part"),
    ("user@host:9100", "has a host that is neither a name nor an IPv4 address"),
])
def test_metrics_addr_refuses_everything_but_host_port(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str,
) -> None:
    """A metrics_addr `run` could not bind for its form (a scheme, whitespace, a path,
    non-ASCII digits, unbracketed IPv6, a port outside 1-65535) is refused when the settings
    are loaded, in one line naming the setting, its source and HOST:PORT."""
    monkeypatch.setenv("AGENT_SIDECAR_METRICS_ADDR", value)
    with pytest.raises(ConfigError) as err:
        config.load()
    [line] = str(err.value).splitlines()
    assert line.startswith("invalid metrics_addr (from env AGENT_SIDECAR_METRICS_ADDR): "
                           f"{problem}; expected HOST:PORT, like 127.0.0.1:9464 or "
                           "[::1]:9464"), line


@pytest.mark.parametrize(("value", "host", "port"), [
    ("127.0.0.1:9464", "127.0.0.1", 9464),
    ("localhost:1", "localhost", 1),
    ("[::1]:65535", "::1", 65535),
    ("metrics-host.example.com:9100", "metrics-host.example.com", 9100),
])
def test_metrics_addr_in_its_forms_is_accepted(value: str, host: str, port: int) -> None:
    """An IPv4 address, a host name or a bracketed IPv6 address with a port 1-65535 pass,
    and the daemon binds the host without its brackets."""
    assert config.load({"metrics_addr": value}).settings.metrics_addr == value
    assert config.parse_hostport(value) == (host, port)
