"""Where the relay socket lives: one rule, shared by the daemon's settings and the clients.

The socket is, in order: the `--socket` flag, `AGENT_SIDECAR_SOCKET`, the `socket` key of the
TOML file named by `AGENT_SIDECAR_CONFIG`, `$XDG_RUNTIME_DIR/agent-sidecar.sock`, and else
`${TMPDIR:-/tmp}/agent-sidecar-<uid>/agent-sidecar.sock`. That last directory sits in a
world-writable place, so the daemon creates it 0700 and verifies it on every start: another
local user who created it first could otherwise serve the socket in our place.

Standard library only, and no pathlib: `check`, `status` and `send` import this module, and
what they import is what every health probe pays for.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

SOCKET_ENV = "AGENT_SIDECAR_SOCKET"
CONFIG_ENV = "AGENT_SIDECAR_CONFIG"
SOCKET_NAME = "agent-sidecar.sock"


class UnsafeDirectory(Exception):
    """The socket's private directory cannot be trusted; the message says what to do."""


def _absolute(environ: Mapping[str, str], name: str) -> str | None:
    # Empty or relative values are ignored, as the XDG spec asks: a relative path would
    # point somewhere else for every process started from another directory.
    value = environ.get(name, "")
    return value if os.path.isabs(value) else None


def private_dir(environ: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """`${TMPDIR:-/tmp}/agent-sidecar-<uid>`: the directory used without XDG_RUNTIME_DIR."""
    environ = os.environ if environ is None else environ
    base = _absolute(environ, "TMPDIR") or "/tmp"  # noqa: S108 - made private below
    return os.path.join(base, f"agent-sidecar-{os.getuid() if uid is None else uid}")


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """The socket when neither a flag, the environment nor the config file names one."""
    environ = os.environ if environ is None else environ
    runtime_dir = _absolute(environ, "XDG_RUNTIME_DIR")
    if runtime_dir:
        return os.path.join(runtime_dir, SOCKET_NAME)
    return os.path.join(private_dir(environ), SOCKET_NAME)


class ConfigFileError(Exception):
    """The config file cannot be used; the message is one line naming it and the problem."""


def read_config_file(name: str) -> dict[str, object]:
    """The TOML file `name` as a table. Raises ConfigFileError when it is missing,
    unreadable (a directory included) or not valid TOML: the daemon's settings and the
    clients read it through here, so they refuse the same file with the same line."""
    import tomllib  # only when a config file is in use

    try:
        with open(name, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigFileError(
            f"config file {name}: not found (set with --config or {CONFIG_ENV})") from None
    except OSError as exc:
        raise ConfigFileError(
            f"config file {name}: cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {name}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 text
        raise ConfigFileError(f"config file {name}: not valid TOML: not UTF-8 text (byte "
                              f"{exc.start})") from None


def _from_config_file(environ: Mapping[str, str], used: bool) -> str | None:
    """The file's `socket`, when a file is named. The file is read even when its socket is
    not `used` (a flag or the variable wins), since `run` refuses a file it cannot read;
    its `socket` value is checked only when used, as `run` checks only the winning one."""
    name = environ.get(CONFIG_ENV)
    if not name:
        return None
    value = read_config_file(name).get("socket")
    if not used:
        return None
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigFileError(f"config file {name}: socket must be a path, like "
                              f'"/run/user/1000/{SOCKET_NAME}"; leave it out for the default')
    return value


def socket_path(flag: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The socket a client talks to: the same rule as the daemon's `socket` setting. A
    config file named by AGENT_SIDECAR_CONFIG is read even when the flag or the variable
    wins, and raises ConfigFileError when it cannot be used: `run` refuses such a file, so
    falling back to another socket would talk to another daemon than the file names."""
    environ = os.environ if environ is None else environ
    chosen = flag or environ.get(SOCKET_ENV)
    from_file = _from_config_file(environ, used=not chosen)
    return chosen or from_file or default_socket_path(environ)


def ensure_private_dir(socket: str, environ: Mapping[str, str] | None = None, *,
                       create: bool = True) -> str:
    """If `socket` is in the per-uid directory, create that 0700 and verify it is ours; the
    path to bind the socket at.

    The per-uid directory is found as the kernel finds it: TMPDIR with its symlinks
    resolved, then `agent-sidecar-<uid>` itself, which is never followed. So any spelling of
    the socket's directory that leads there (`$TMPDIR//`, `/./`, `..`, a symlink to TMPDIR
    or to the directory) is verified, on every start: a directory, not a symlink, owned by
    us, mode exactly 0700, in a TMPDIR owned by us or root (another user's, reached through
    a symlink, could rename it). The path returned is the socket's within the directory
    verified, so a symlink in TMPDIR's path that changes after the check cannot move the
    socket elsewhere. Other directories (XDG_RUNTIME_DIR, or one chosen with --socket) are
    the user's to choose, and `socket` comes back as it is; the daemon only creates a
    missing one 0700. With `create=False` (`config`, a dry run) a missing directory passes:
    `run` will create it. Raises UnsafeDirectory, or OSError when TMPDIR cannot be read.
    """
    private = private_dir(environ)
    # Resolve TMPDIR, but not the last component: a symlink planted there must be seen as
    # one, not followed to wherever it points.
    parent = os.path.realpath(os.path.dirname(private))
    directory = os.path.join(parent, os.path.basename(private))
    # Whether the socket's directory is that one, however spelled: both resolved alike.
    here = os.path.realpath(os.path.dirname(socket) or os.curdir)
    if here != os.path.realpath(directory):
        return socket
    advice = ("set XDG_RUNTIME_DIR to a private directory, or choose the socket with --socket "
              "(or AGENT_SIDECAR_SOCKET)")
    owner = os.stat(parent).st_uid
    if owner not in (0, os.getuid()):
        raise UnsafeDirectory(
            f"socket directory {directory} is in {parent}, which belongs to uid {owner}, "
            f"not to us (uid {os.getuid()}) or root: its owner could replace the directory "
            f"and serve the socket in our place; {advice}")
    if create:
        try:
            os.mkdir(directory, 0o700)  # the umask can only make it stricter; fixed below
        except FileExistsError:
            pass
        else:
            os.chmod(directory, 0o700)
    socket_in_directory = os.path.join(directory, os.path.basename(socket))
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return socket_in_directory  # only without create: `run` will make it
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"socket directory {directory} is a symlink, which another user "
                              f"may have planted; remove it, or {advice}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"socket directory {directory} is not a directory; remove it, "
                              f"or {advice}")
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(
            f"socket directory {directory} belongs to uid {st.st_uid}, not to us (uid "
            f"{os.getuid()}): another user created it first and could serve the socket in "
            f"our place; {advice}")
    mode = st.st_mode & 0o777  # a setgid bit inherited from the parent is harmless
    if mode != 0o700:
        raise UnsafeDirectory(f"socket directory {directory} has mode {mode:04o}, not 0700; "
                              f"run `chmod 700 {directory}`, or {advice}")
    return socket_in_directory
