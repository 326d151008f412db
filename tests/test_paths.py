"""Where the socket is: one rule for the daemon and the clients, and a private directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent_sidecar import config, paths
from agent_sidecar.relay import RelayError, bind_unix

UID = os.getuid()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("AGENT_SIDECAR_", "CODER_")) or name in ("XDG_RUNTIME_DIR",
                                                                      "TMPDIR"):
            monkeypatch.delenv(name)


@pytest.fixture
def tmpdir_env(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR is a fresh directory, so the per-uid directory is ours to create and spoil."""
    monkeypatch.setenv("TMPDIR", str(short_dir))
    return short_dir / f"agent-sidecar-{UID}"


@pytest.mark.parametrize(("environ", "flag", "expected"), [
    ({}, None, f"/tmp/agent-sidecar-{UID}/agent-sidecar.sock"),
    ({"TMPDIR": "/var/tmp"}, None, f"/var/tmp/agent-sidecar-{UID}/agent-sidecar.sock"),
    ({"TMPDIR": ""}, None, f"/tmp/agent-sidecar-{UID}/agent-sidecar.sock"),
    ({"TMPDIR": "relative"}, None, f"/tmp/agent-sidecar-{UID}/agent-sidecar.sock"),
    ({"TMPDIR": "/var/tmp", "XDG_RUNTIME_DIR": "/run/user/7"}, None,
     "/run/user/7/agent-sidecar.sock"),
    ({"XDG_RUNTIME_DIR": "run/user/7"}, None, f"/tmp/agent-sidecar-{UID}/agent-sidecar.sock"),
    ({"XDG_RUNTIME_DIR": "/run/user/7", "AGENT_SIDECAR_SOCKET": "/s/env.sock"}, None,
     "/s/env.sock"),
    ({"AGENT_SIDECAR_SOCKET": ""}, None, f"/tmp/agent-sidecar-{UID}/agent-sidecar.sock"),
    ({"AGENT_SIDECAR_SOCKET": "/s/env.sock"}, "/s/flag.sock", "/s/flag.sock"),
])
def test_socket_precedence(environ: dict[str, str], flag: str | None, expected: str) -> None:
    """Flag, then AGENT_SIDECAR_SOCKET, then $XDG_RUNTIME_DIR, then the per-uid directory in
    ${TMPDIR:-/tmp}; empty and relative directories are ignored."""
    assert paths.socket_path(flag, environ) == expected


def test_the_config_file_names_the_socket_below_the_environment(tmp_path: Path) -> None:
    """The `socket` key of AGENT_SIDECAR_CONFIG's file counts after the variable, before the
    default; a file without one falls through to the default."""
    path = tmp_path / "c.toml"
    path.write_text('socket = "/s/file.sock"\n')
    environ = {"AGENT_SIDECAR_CONFIG": str(path)}
    assert paths.socket_path(None, environ) == "/s/file.sock"
    assert paths.socket_path(None, {**environ, "AGENT_SIDECAR_SOCKET": "/s/e.sock"}) == "/s/e.sock"
    path.write_text("settle_s = 1\n")
    assert paths.socket_path(None, environ) == paths.default_socket_path(environ)


@pytest.mark.parametrize(("content", "problem"), [
    (None, "not found"),
    ("DIR", "cannot be read: Is a directory"),
    ("socket = \n", "not valid TOML"),
    ("socket = 5\n", "socket must be a path"),
    ('socket = ""\n', "socket must be a path"),
    ('socket = " "\n', "socket must be a path"),
    (b'\xff\xfe socket = "x"\n', "not valid TOML: not UTF-8 text (byte 0)"),
])
@pytest.mark.parametrize("flag", [None, "/s/flag.sock"])
def test_a_config_file_the_daemon_refuses_is_refused_not_skipped(
    tmp_path: Path, content: str | bytes | None, problem: str, flag: str | None,
) -> None:
    """A config file AGENT_SIDECAR_CONFIG names that is missing, unreadable or not TOML (not
    UTF-8 included) raises ConfigFileError naming the file and the problem, even when the
    flag names the socket, instead of falling back to another socket; a socket in it that
    is not a path does so when it is the one used, and loses to the flag as in `run`."""
    path = tmp_path / "c.toml"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    environ = {"AGENT_SIDECAR_CONFIG": str(path)}
    if flag is not None and problem.startswith("socket"):
        # The file's socket loses to the flag, and `run` checks only the value it uses.
        assert paths.socket_path(flag, environ) == flag
        return
    with pytest.raises(paths.ConfigFileError) as err:
        paths.socket_path(flag, environ)
    assert str(err.value).startswith(f"config file {path}: {problem}"), err.value
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("environ", [
    {},
    {"TMPDIR": "/var/tmp"},
    {"XDG_RUNTIME_DIR": "/run/user/7"},
    {"XDG_RUNTIME_DIR": "/run/user/7", "AGENT_SIDECAR_SOCKET": "/s/env.sock"},
    {"AGENT_SIDECAR_CONFIG": "FILE"},
    {"AGENT_SIDECAR_CONFIG": "FILE", "AGENT_SIDECAR_SOCKET": "/s/env.sock"},
])
def test_the_daemon_and_the_clients_find_the_same_socket(
    environ: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon's `socket` setting and the light client's lookup agree in every case."""
    path = tmp_path / "c.toml"
    path.write_text('socket = "/s/file.sock"\n')
    for name, value in environ.items():
        monkeypatch.setenv(name, str(path) if value == "FILE" else value)
    assert str(config.load().settings.socket) == paths.socket_path()


def test_the_variable_names_are_spelled_once() -> None:
    """paths.py reads the same variables the settings do."""
    assert config.env_names("socket") == (paths.SOCKET_ENV,)
    assert config.CONFIG_ENV == paths.CONFIG_ENV


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_the_private_directory_is_created_0700(tmpdir_env: Path, umask: int) -> None:
    """Binding the default socket creates its per-uid directory 0700 whatever the umask."""
    old = os.umask(umask)
    try:
        bind_unix(Path(paths.default_socket_path())).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(tmpdir_env.lstat().st_mode) == 0o700
    assert stat.S_ISSOCK((tmpdir_env / "agent-sidecar.sock").lstat().st_mode)


def test_a_symlinked_private_directory_is_refused(tmpdir_env: Path, short_dir: Path) -> None:
    """A symlink where the per-uid directory should be is refused, even to a 0700 dir of ours."""
    target = short_dir / "elsewhere"
    target.mkdir(mode=0o700)
    tmpdir_env.symlink_to(target)
    with pytest.raises(RelayError, match="is a symlink"):
        bind_unix(Path(paths.default_socket_path()))
    assert list(target.iterdir()) == []


def test_a_private_directory_open_to_others_is_refused(tmpdir_env: Path) -> None:
    """A per-uid directory of ours with mode 0755 is refused, with the chmod that fixes it."""
    tmpdir_env.mkdir()
    tmpdir_env.chmod(0o755)
    with pytest.raises(RelayError, match=r"has mode 0755, not 0700; run `chmod 700 "):
        bind_unix(Path(paths.default_socket_path()))


def test_a_file_in_place_of_the_private_directory_is_refused(tmpdir_env: Path) -> None:
    """Something that is not a directory where the per-uid directory belongs is refused."""
    tmpdir_env.write_text("")
    with pytest.raises(RelayError, match="is not a directory"):
        bind_unix(Path(paths.default_socket_path()))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")
def test_a_private_directory_of_another_user_is_refused(tmpdir_env: Path) -> None:
    """A per-uid directory owned by someone else is refused, saying what to do instead."""
    tmpdir_env.mkdir(mode=0o700)
    os.chown(tmpdir_env, 65534, 65534)
    with pytest.raises(RelayError) as err:
        bind_unix(Path(paths.default_socket_path()))
    message = str(err.value)
    assert f"belongs to uid 65534, not to us (uid {UID})" in message
    assert "set XDG_RUNTIME_DIR" in message
    assert "--socket" in message


def test_a_dry_run_neither_creates_nor_accepts_a_bad_directory(tmpdir_env: Path) -> None:
    """Without create (`config`), a missing per-uid directory passes and stays missing, and a
    spoilt one is refused as `run` would refuse it."""
    socket = paths.default_socket_path()
    paths.ensure_private_dir(socket, create=False)
    assert not tmpdir_env.exists()
    tmpdir_env.mkdir(mode=0o700)
    tmpdir_env.chmod(0o750)
    with pytest.raises(paths.UnsafeDirectory, match="has mode 0750"):
        paths.ensure_private_dir(socket, create=False)


def test_other_directories_are_the_users_choice(short_dir: Path) -> None:
    """A socket outside the per-uid directory is bound in an existing directory as it is."""
    shared = short_dir / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    bind_unix(shared / "s.sock").close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


@pytest.mark.parametrize("spelling", ["{t}/", "{t}//", "{t}/.", "{t}/./", "{t}/../{name}",
                                      "{t}/sub/..", "{link}"])
def test_every_spelling_of_tmpdir_is_verified(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, spelling: str,
) -> None:
    """However TMPDIR spells the directory (slashes, `.`, `..`, a symlink to it), the per-uid
    directory in it is verified: a symlink planted there is refused by `run` and a dry run."""
    (short_dir / "sub").mkdir()
    (short_dir.parent / f"{short_dir.name}-link").symlink_to(short_dir)
    try:
        tmpdir = spelling.format(t=short_dir, name=short_dir.name,
                                 link=f"{short_dir}-link")
        monkeypatch.setenv("TMPDIR", tmpdir)
        target = short_dir / "elsewhere"
        target.mkdir(mode=0o700)
        (short_dir / f"agent-sidecar-{UID}").symlink_to(target)
        # As the settings spell it (pathlib drops "//" and "."), and as the clients do.
        for socket in (str(config.load().settings.socket), paths.default_socket_path()):
            with pytest.raises(paths.UnsafeDirectory, match="is a symlink"):
                paths.ensure_private_dir(socket, create=False)
            with pytest.raises(RelayError, match="is a symlink"):
                bind_unix(Path(socket))
        assert list(target.iterdir()) == []
    finally:
        (short_dir.parent / f"{short_dir.name}-link").unlink()


def test_the_socket_is_bound_in_the_directory_verified(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With TMPDIR a symlink, the per-uid directory is made, verified and bound in where the
    symlink leads at the check, so changing it later cannot move the socket elsewhere."""
    real = short_dir / "real"
    real.mkdir()
    link = short_dir / "link"
    link.symlink_to(real)
    monkeypatch.setenv("TMPDIR", str(link))
    socket = Path(paths.default_socket_path())
    assert paths.ensure_private_dir(str(socket)) == str(
        real / f"agent-sidecar-{UID}" / "agent-sidecar.sock")
    bind_unix(socket).close()
    assert stat.S_ISSOCK((real / f"agent-sidecar-{UID}" / "agent-sidecar.sock").lstat().st_mode)
    assert stat.S_IMODE((real / f"agent-sidecar-{UID}").lstat().st_mode) == 0o700


def test_other_directories_come_back_as_they_are(short_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket outside the per-uid directory is neither verified nor moved."""
    monkeypatch.setenv("TMPDIR", str(short_dir))
    socket = f"{short_dir}/other/../x.sock"
    assert paths.ensure_private_dir(socket, create=False) == socket
