"""The relay's Unix socket at the level of the kernel: binding the private socket file, who
the peer is (SO_PEERCRED), and whether the peer has hung up for good (POLLHUP) or only shut
down its write side. No HTTP here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import select
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from agent_sidecar import paths

UNIX_PATH_MAX = 107


class RelayError(Exception):
    """The socket cannot be served; the message says why and what to do."""


def check_socket_path(path: Path) -> Path:
    """Every check `bind_unix` makes before it binds, creating nothing (`config`, a dry run):
    the per-uid directory (paths.ensure_private_dir), the path's length, a parent directory
    that exists or can be created, nothing but a socket at the path, and a parent that can
    hold a socket. Whether a socket
    there is in use is not asked: `config` runs next to a running daemon. The path that
    would be bound; raises RelayError."""
    return _checked(path, create=False)


def _checked(path: Path, *, create: bool) -> Path:
    """The path to bind at, checked; with `create`, its directories are made (0700)."""
    try:
        path = Path(paths.ensure_private_dir(str(path), create=create))
    except paths.UnsafeDirectory as exc:
        raise RelayError(str(exc)) from None
    except OSError as exc:  # TMPDIR missing or unreadable, or the directory not makeable
        raise RelayError(f"cannot make the socket directory for {path} in "
                         f"{exc.filename or 'TMPDIR'}: {exc.strerror or exc}; set TMPDIR to a "
                         "directory of yours, or choose the socket with --socket") from None
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise RelayError(f"socket path {path} is longer than {UNIX_PATH_MAX} bytes; "
                         "choose a shorter --socket")
    parent = path.parent
    try:
        if not create:
            _creatable(parent)
        elif not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
            parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise RelayError(f"cannot create the socket directory {parent}: "
                         f"{exc.strerror or exc}; choose another --socket") from None
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass  # nothing there yet (in a dry run, maybe not even its directory)
    except OSError as exc:
        raise RelayError(f"cannot use the socket path {path}: {exc.strerror or exc}; "
                         "choose another --socket") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise RelayError(f"{path} exists and is not a socket; refusing to replace it")
    if parent.is_dir():  # in a dry run it may not exist yet: _creatable tried its ancestor
        try:
            _probe_socket(parent)
        except OSError as exc:
            raise RelayError(f"cannot make a socket in {parent}: {exc.strerror or exc}; "
                             "choose another --socket") from None
    return path


def _probe_socket(directory: Path) -> None:
    """Raise OSError unless a socket can be bound in `directory`: tried with a uniquely
    named one, removed at once. An existing directory can still refuse sockets (procfs,
    sysfs, a read-only mount) and only binding tells, so `config` and `run` both ask here,
    before anything is replaced, and say the same line. A socket of the same name being
    served is never touched: the name is new."""
    probe = directory / f".as-probe-{os.getpid()}-{secrets.token_hex(4)}"
    if len(os.fsencode(probe)) > UNIX_PATH_MAX:  # the socket's own name may be shorter
        os.mkdir(probe, 0o700)  # the next best test: can anything be made there
        os.rmdir(probe)
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(probe))
        os.unlink(probe)
    finally:
        sock.close()


def _creatable(directory: Path) -> None:
    """Raise OSError unless `directory` exists or `mkdir -p` could make it. Its nearest
    existing ancestor must be a directory where one can be made: tried with a uniquely
    named directory, removed at once, since neither the mode bits (root passes them) nor
    the mount options tell (procfs refuses every mkdir)."""
    if directory.exists():
        return  # as `run` sees it; what is at the socket path is checked next
    existing = directory
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    probe = existing / f".agent-sidecar-probe-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(probe, 0o700)
    os.rmdir(probe)


def bind_unix(path: Path) -> socket.socket:
    """Bind a private listening socket at `path`, replacing a stale one, never a live one.
    In the per-uid directory it is bound within the directory verified (see
    paths.ensure_private_dir), however `path` spells it. Raises RelayError."""
    path = _checked(path, create=True)
    if os.path.lexists(path):  # a socket: _checked refuses anything else
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale: nobody is listening
        except OSError as exc:
            raise RelayError(f"cannot probe existing socket {path}: {exc.strerror}") from None
        else:
            raise RelayError(f"another process is serving {path}; stop it or choose "
                             "another --socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is never, even briefly, open to others
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise RelayError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    path.chmod(0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def remove_socket_file(path: Path, inode: int) -> None:
    """Remove the socket file at `path` if it is still the one we bound (inode `inode`): a
    successor may already have bound the path."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_ino == inode:
            path.unlink()


def peer_uid(request: web.Request) -> int | None:
    """The connecting process's uid (SO_PEERCRED), or None if the transport has none."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def hung_up(fd: int) -> bool:
    """The peer of this stream socket has hung up for good (POLLHUP). A half-close (the peer
    shut down only its write side) does not raise POLLHUP."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLHUP and POLLERR are reported whatever the mask
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


class Hangups:
    """Tells when half-closed peers hang up for good, without polling: one epoll holds the
    watched sockets with an empty mask (epoll always reports EPOLLHUP and EPOLLERR), and the
    event loop watches that epoll. A callback runs once per watched socket; `unwatch` before
    the socket is closed. Linux only; `create()` returns None elsewhere, and raises OSError
    when no epoll can be made. Owns that epoll descriptor until `close()`; nothing in it
    awaits, so there is nothing to cancel."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    @classmethod
    def create(cls, loop: asyncio.AbstractEventLoop) -> Hangups | None:
        return cls(loop) if hasattr(select, "epoll") else None

    def watch(self, fd: int, on_hangup: Callable[[], None]) -> None:
        if fd not in self._callbacks:
            self._epoll.register(fd, 0)
        self._callbacks[fd] = on_hangup

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _ready(self) -> None:
        for fd, _events in self._epoll.poll(0):
            callback = self._callbacks.get(fd)
            self.unwatch(fd)
            if callback is not None:
                callback()

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._callbacks.clear()
