"""main(): subcommands, asyncio.run, logging setup and exit codes. Only this module exits.

Two weights of command. `check`, `status`, `send`, `--help` and `--version` run on the
standard library alone (the relay client is `client.py`, the socket rule `paths.py`): a
health probe runs `check` every 30 s in every workspace, and importing the daemon's stack
would cost it ten times over. `run`, `snapshot`, `config` and `demo` import what they need
inside their functions, and their settings flags are built from the settings model only
when one of them is the command being parsed.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

from agent_sidecar import client, paths

TYPE_CHECKING = False
if TYPE_CHECKING:  # the annotations' names only: `typing` is not free at start-up
    from collections.abc import Callable, Sequence
    from pathlib import Path
    from typing import Any, NoReturn

    from agent_sidecar import config
    from agent_sidecar.config import Settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # bad configuration or usage: retrying will not help
EXIT_INTERRUPTED = 130
# stdout or stderr is a pipe whose reader left (`status --json | head -1`): 128 + SIGPIPE,
# what the shell reports for a program the signal ended, as it would have ended us.
EXIT_PIPE_CLOSED = 141
# What writing stdout fails with when the output cannot be taken (not a closed pipe).
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})

# `send`'s exit codes, from the relay's answer (README: "The relay API").
EXIT_BUSY = 3  # 409: still busy after the wait; nothing was sent
EXIT_UNKNOWN = 4  # 504, or no answer: sent, outcome unknown; do not resend blindly
EXIT_UNREACHABLE = 5  # 503, 408 or no connection: never sent
EXIT_INCOMPLETE = 6  # 200 with "incomplete": delivered, part of the answer printed
_SEND_EXITS = {204: EXIT_OK, 200: EXIT_OK, 400: EXIT_CONFIG, 413: EXIT_CONFIG,
               409: EXIT_BUSY, 502: EXIT_FAILURE, 503: EXIT_UNREACHABLE, 504: EXIT_UNKNOWN,
               408: EXIT_UNREACHABLE}
# What `send` assumes of a daemon whose GET /status does not say (relay.send_wait_s,
# relay.send_timeout_s), and how much longer than the relay's own bound it waits.
DEFAULT_SEND_WAIT_S = 30.0
DEFAULT_SEND_TIMEOUT_S = 60.0
SEND_MARGIN_S = 5.0

_DESCRIPTION = """\
Keeps Coder's task log snapshot fresh from agentapi's conversation, and relays input to
the agent over a private Unix socket.

Settings come from flags, then AGENT_SIDECAR_* environment variables (and Coder's own
CODER_AGENT_URL, CODER_AGENT_TOKEN, CODER_AGENT_TOKEN_FILE), then the TOML file given by
--config or AGENT_SIDECAR_CONFIG, then defaults. `agent-sidecar config` shows the result.
"""

_EPILOG = """\
exit codes: 0 ok, 1 failed, 2 bad configuration or usage, 130 interrupted twice,
141 the output was a pipe closed by its reader; `send` has more (see
`agent-sidecar send --help`).
"""

_SEND_EPILOG = """\
exit codes:
  0    delivered (with --reply: and the agent's answer printed)
  1    refused by agentapi (its reason on stderr), or another failure
  2    usage or configuration (the relay's 400 or 413)
  3    the agent was still busy after the wait (409); nothing was sent
  4    sent, outcome unknown (504, or no answer in time): the input may have been typed;
       do not resend it blindly
  5    never sent: the sidecar cannot be reached (or its socket is served by another
       user), it cannot reach agentapi (503), or the request was too slow to arrive (408)
  6    with --reply: delivered, but the answer printed is incomplete (why on stderr),
       or stdout could not take it; do not resend it, it was delivered
  130  interrupted
  141  the output was a pipe closed by its reader
"""


def _width() -> int:
    """The help width, as argparse finds it, without importing shutil (and bz2, lzma) on
    every start: argparse makes a formatter for each argument it adds."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        stdout = sys.__stdout__
        try:
            columns = os.get_terminal_size(stdout.fileno()).columns if stdout else 80
        except (ValueError, OSError):  # not a terminal, or no descriptor
            columns = 80
    return columns - 2


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error of a heavy command (`run` under systemd, say)
    is said as its other refusals are (see `_say_refused`): with journald's error priority,
    and as a JSON line when that is the log format. A light command keeps argparse's own
    lines, so that its usage errors import nothing heavy. `command` is the command argv
    names (the top-level parser reports unknown arguments of every command)."""

    def __init__(self, *args: Any, command: str | None = None, **kwargs: Any) -> None:
        # No abbreviations: `--coder-token SECRET` must not be taken for --coder-token-file,
        # which would put the token in argv's meaning and in the error that names the file.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.command = command

    def error(self, message: str) -> NoReturn:
        command = self.command or self.prog.rpartition(" ")[2]
        if command not in _HEAVY:
            super().error(message)
        usage = self.format_usage().rstrip("\n")
        _say_refused("usage_invalid", [f"{self.prog}: error: {message}"],
                     _log_format(command, None),
                     plain=[*usage.splitlines(), f"{self.prog}: error: {message}"],
                     usage=" ".join(usage.split()))
        sys.exit(EXIT_CONFIG)


def _unrecognized(extras: Sequence[str]) -> str:
    """argparse's "unrecognized arguments" without their values, which may be secrets:
    option names as far as their `=`, and a count of the rest. Says where the token goes
    when one of them looks like a token flag."""
    names = [arg.partition("=")[0] for arg in extras if arg.startswith("-")]
    hidden = len(extras) - len(names)
    text = "unrecognized arguments: " + " ".join(names)
    if hidden:
        text += f"{' and ' if names else ''}{hidden} value{'s' * (hidden > 1)} (not shown)"
    if any("tok" in name.lower() for name in names):
        text += ("; the agent token is never a flag, where any local user could read it: "
                 "set CODER_AGENT_TOKEN, or CODER_AGENT_TOKEN_FILE (--coder-token-file PATH)")
    return text


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The top level: its description has paragraphs of its own."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=_width())


class _Wrapping(argparse.HelpFormatter):
    """Subcommands: one-paragraph descriptions, wrapped to the terminal; an epilog with line
    breaks of its own (a table of exit codes) is kept as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=_width())

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap  # argparse's own wrapping breaks socket paths at their hyphens

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Version(argparse.Action):
    """--version, resolved only when asked for: the lookup reads the installed metadata."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from agent_sidecar import __version__

        print(f"agent-sidecar {__version__}")
        parser.exit()


def _path(text: str) -> Path:
    from pathlib import Path  # not at start-up: the light commands take plain strings

    return Path(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more: {text!r}")
    return value


def _timeout(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


_METAVARS = {"agentapi_url": "URL", "coder_url": "URL", "coder_token_file": "PATH",
             "task_id": "UUID", "sink_dir": "DIR", "socket": "PATH", "log_format": "FORMAT",
             "log_level": "LEVEL", "metrics_addr": "HOST:PORT"}


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    from agent_sidecar import config
    from agent_sidecar.config import Settings

    group = parser.add_argument_group(
        "settings", "Each is also an environment variable. The agent token is read only "
        "from CODER_AGENT_TOKEN or a token file: never from a flag, where any local user "
        "could read it.")
    group.add_argument("--config", type=_path, metavar="PATH",
                       help=f"TOML settings file (env {config.CONFIG_ENV})")
    for name, info in Settings.model_fields.items():
        if name == "coder_token":
            continue
        env = " or ".join(config.env_names(name))
        default = info.get_default(call_default_factory=True)
        shown = "" if default is None else f", default {default}"
        metavar = _METAVARS.get(name) or (
            "BYTES" if name.endswith("_bytes") else "SECONDS" if name.endswith("_s")
            else "COUNT")
        group.add_argument(config.flag_name(name), dest=name, metavar=metavar,
                           help=f"{info.description} (env {env}{shown})")


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    from agent_sidecar.config import Settings

    fields = Settings.model_fields
    return {n: getattr(args, n) for n in fields if getattr(args, n, None) is not None}


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH",
                        help=f"relay socket (default: {paths.SOCKET_ENV}, else the config "
                        f"file's, else {paths.default_socket_path()})")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for `argv`. The settings flags of run, snapshot and config come from the
    settings model; they are built only for the command that `argv` names, so that the
    light commands and the top-level --help never import it."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)

    def settings_flags(parser: argparse.ArgumentParser) -> None:
        if parser.prog.rpartition(" ")[2] == command:
            _settings_flags(parser)

    parser = _Parser(prog="agent-sidecar", description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=_Formatter, command=command)
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon: follow agentapi, upload, relay",
                         description="Follow agentapi, keep Coder's snapshot fresh (or the "
                         "sink, without Coder), and serve the relay socket until SIGTERM or "
                         "Ctrl+C. SIGHUP reloads the config; a second Ctrl+C exits at once.",
                         formatter_class=_Wrapping)
    settings_flags(run)

    snap = sub.add_parser("snapshot", help="pack agentapi's conversation once",
                          description="Read GET /messages once and print the packed snapshot "
                          "body, or write it with --output. With --upload, send it to Coder "
                          "with retries: a drop-in for the agentapi module's shutdown script.",
                          formatter_class=_Wrapping)
    snap.add_argument("--output", "-o", type=_path, metavar="FILE",
                      help="write the body here instead of stdout")
    snap.add_argument("--upload", action="store_true", help="upload it to Coder")
    snap.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="give up on the upload after this long, retries included (30)")
    settings_flags(snap)

    send = sub.add_parser("send", help="send input to the agent through the relay",
                          description="Deliver TEXT to the agent. A user message waits until "
                          "the agent is ready; --raw sends keystrokes at once. It waits as "
                          "long as the daemon may take to answer (the wait, plus its "
                          "send_timeout_s, from GET /status, plus 5 s), and never gives up "
                          "earlier unless --timeout says so.",
                          epilog=_SEND_EPILOG, formatter_class=_Wrapping)
    send.add_argument("text", metavar="TEXT", help="the input, or - to read it from stdin")
    send.add_argument("--raw", action="store_true",
                      help="send keystrokes as they are (e.g. $'\\x1b' for Escape), no waiting")
    send.add_argument("--wait", type=_seconds, metavar="SECONDS",
                      help="how long the relay waits for the agent to be ready (default: "
                      f"the daemon's send_wait_s, {DEFAULT_SEND_WAIT_S:g} if it does not say)")
    send.add_argument("--reply", action="store_true",
                      help="wait until the agent has answered and is ready again, then print "
                      "its new message(s) to stdout")
    send.add_argument("--json", action="store_true",
                      help='with --reply, print the answer as JSON: {"messages": [{"id", '
                      '"role", "content", "time"}]}')
    send.add_argument("--timeout", type=_timeout, metavar="SECONDS",
                      help="give up after this long in all, --reply included (exit 4 once "
                      "the input is sent; default: the daemon's own bound, and no limit "
                      "for --reply)")
    _socket_arg(send)

    status = sub.add_parser("status", help="show what the running daemon is doing",
                            formatter_class=_Wrapping)
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    _socket_arg(status)

    check = sub.add_parser("check", help="health check: exit 0 if healthy, 1 if not",
                           description="Readiness (GET /healthz): one line, and exit 0 when "
                           "healthy or degraded, 1 otherwise: not following agentapi, uploads "
                           "failing, shutting down, or no daemon. Suits a Docker HEALTHCHECK "
                           "and a readiness probe. With --live, liveness only (GET /livez): "
                           "exit 0 while the daemon's event loop answers and its tasks run, "
                           "whatever agentapi or coderd do; for a liveness probe, which "
                           "restarts the daemon and so drops its conversation.",
                           formatter_class=_Wrapping)
    check.add_argument("--live", action="store_true",
                       help="liveness only: is the daemon itself alive?")
    _socket_arg(check)

    cfg = sub.add_parser("config", help="print the effective settings and their sources",
                         description="Print every setting, its value and where it came from. "
                         "Exit 2 if the configuration is invalid: it runs every check `run` "
                         "runs but \"socket in use\", so it can vet a configuration next to "
                         "a running daemon.",
                         formatter_class=_Wrapping)
    cfg.add_argument("--json", action="store_true", help="print JSON")
    settings_flags(cfg)

    demo = sub.add_parser("demo", help="see it work: a simulated agent, the sidecar, a sink",
                          description="Start a simulated agentapi on loopback, run the full "
                          "sidecar against it with snapshots going to a sink directory, send "
                          "a prompt through the relay, and print each snapshot written.",
                          formatter_class=_Wrapping)
    demo.add_argument("--once", action="store_true", help="one scripted exchange, then exit 0")
    demo.add_argument("--dir", type=_path, metavar="DIR",
                      help="where the socket and the sink go (default: a new temporary dir)")
    return parser


# -- commands -------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> config.Loaded:
    from agent_sidecar import config

    return config.load(_flags(args), config_file=args.config)


def _setup_logs(settings: Settings) -> None:
    from agent_sidecar import logs

    logs.configure(settings.log_level, settings.log_format)
    logs.capture_uncaught()
    if settings.coder_token:
        logs.redactor.add(settings.coder_token.get_secret_value())
    for url in (settings.coder_url, settings.agentapi_url):
        logs.redactor.add_url(url)


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from agent_sidecar import config, logs
    from agent_sidecar.daemon import Controls, serve
    from agent_sidecar.sdnotify import Notifier

    loaded = _load(args)
    _setup_logs(loaded.settings)

    def reread() -> Settings:
        new = config.load(_flags(args), config_file=loaded.config_file).settings
        # Logging belongs to main(), not to serve(): the level is applied here. Only the
        # level: configuring again would also restart the repeat limiter's windows.
        logs.set_level(new.log_level)
        return new

    async def main() -> int:
        controls = Controls()
        _install_signals(controls.shutdown.set, controls.force.set, controls.reload.set)
        try:
            return await serve(loaded.settings, controls, reload_settings=reread,
                               notifier=Notifier())
        finally:
            # The shutdown is over; a late SIGTERM (systemd's, Docker's) must not turn the
            # exit code into "killed" while asyncio.run winds down.
            import signal

            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    return asyncio.run(main())


def _install_signals(shutdown: Callable[[], None], force: Callable[[], None],
                     reload: Callable[[], None] | None) -> None:
    """Handlers only set state: the first Ctrl+C or SIGTERM asks for the graceful shutdown,
    a second Ctrl+C forces it (the final upload is cut short, exit 130)."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        (force if interrupts > 1 else shutdown)()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, shutdown)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)


def _cmd_snapshot(args: argparse.Namespace) -> int:
    import asyncio

    from agent_sidecar.oneshot import snapshot

    loaded = _load(args)
    _setup_logs(loaded.settings)
    return asyncio.run(snapshot(loaded.settings, output=args.output, upload=args.upload,
                                timeout_s=args.timeout))


def _socket_path(args: argparse.Namespace) -> str:
    return paths.socket_path(args.socket)


def _get(args: argparse.Namespace, target: str, timeout_s: float) -> tuple[int, Any]:
    resp = client.call(_socket_path(args), "GET", target, timeout_s=timeout_s)
    return resp.status, resp.json()


def shown(text: object) -> str:
    """`text` fit for a terminal: what a peer wrote (an error page, a Location) may hold
    escape sequences that would retitle or clear it, so non-printable characters are shown
    escaped, as Python writes them (`\\x1b`)."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def _print_error(data: Any) -> None:
    if isinstance(data, dict):
        message = data.get("message") or "request failed"
        detail = data.get("detail")
        print(f"agent-sidecar: {shown(message)}" + (f" ({shown(detail)})" if detail else ""),
              file=sys.stderr)
    else:
        print(f"agent-sidecar: {shown(data)}", file=sys.stderr)


def _relay_bounds(path: str, timeout_s: float | None) -> tuple[float, float]:
    """The daemon's (send_wait_s, send_timeout_s) from GET /status, or the defaults when it
    does not say. Raises Unreachable when there is no daemon to ask: nothing is sent then."""
    timeout_s = 10.0 if timeout_s is None else min(10.0, timeout_s)
    try:
        resp = client.call(path, "GET", "/status", timeout_s=timeout_s)
    except client.NoAnswer as exc:
        raise client.Unreachable(str(exc)) from None
    data = resp.json() if resp.status == 200 else None
    relay = data.get("relay") if isinstance(data, dict) else None
    relay = relay if isinstance(relay, dict) else {}

    def number(key: str, default: float) -> float:
        value = relay.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return default
        return float(value) if 0 <= value < float("inf") else default

    return (number("send_wait_s", DEFAULT_SEND_WAIT_S),
            number("send_timeout_s", DEFAULT_SEND_TIMEOUT_S))


def send_bound(wait_s: float, send_timeout_s: float) -> float:
    """How long `send` waits for the relay's answer: never less than the relay may take."""
    return wait_s + send_timeout_s + SEND_MARGIN_S


def _print_reply(data: Any, as_json: bool) -> int:
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        print("agent-sidecar: the relay's reply is not {\"messages\": [...]}; the input was "
              "delivered", file=sys.stderr)
        return EXIT_FAILURE
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print("\n\n".join(m["content"].rstrip("\n") for m in messages))
    incomplete = data.get("incomplete")
    if incomplete:
        # What there is was printed; exit 0 would say the whole answer was.
        sys.stdout.flush()  # before the line on stderr, where both go to one terminal
        print(f"agent-sidecar: the answer above is incomplete: {shown(incomplete)}; the "
              "input was delivered: do not resend it", file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_OK


def _cmd_send(args: argparse.Namespace) -> int:
    if args.json and not args.reply:
        print("agent-sidecar: --json goes with --reply: a plain send prints nothing",
              file=sys.stderr)
        return EXIT_CONFIG
    started = time.monotonic()

    def left() -> float | None:
        return None if args.timeout is None else args.timeout - (time.monotonic() - started)

    text = sys.stdin.read() if args.text == "-" else args.text
    path = _socket_path(args)
    try:
        server_wait_s, send_timeout_s = _relay_bounds(path, left())
        wait_s = server_wait_s if args.wait is None else args.wait
        remaining = left()
        if remaining is not None:
            if remaining <= 0:
                raise client.Unreachable(f"--timeout {args.timeout:g}s ran out before the "
                                         "input was sent")
            # The relay answers 409 at wait_s; leave room for that answer to reach us, so a
            # busy agent reads as "busy, nothing sent" (3), not "outcome unknown" (4).
            wait_s = min(wait_s, max(0.0, remaining - min(SEND_MARGIN_S, remaining / 2)))
        body: dict[str, Any] = {"input": text, "type": "raw" if args.raw else "user",
                                "wait_s": wait_s}
        if args.reply:
            body["reply"] = True
        # The relay answers within wait_s + send_timeout_s, a reply included (it gives up on
        # a reply send_timeout_s after the POST).
        bound = send_bound(wait_s, send_timeout_s)
        if remaining is not None:
            bound = remaining if bound is None else min(bound, remaining)
        with client.Connection(path, bound) as conn:
            try:
                conn.send("POST", "/send", body)
                resp = conn.receive()
            except KeyboardInterrupt:
                # Even mid-write: the relay may have the whole request before we know it.
                print("agent-sidecar: interrupted; the input may already have been delivered",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
    except client.Unreachable as exc:
        print(f"agent-sidecar: {shown(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except client.NoAnswer as exc:
        print(f"agent-sidecar: {shown(exc)}; the input may have been delivered: do not resend it "
              "blindly", file=sys.stderr)
        return EXIT_UNKNOWN
    data = resp.json()
    code = _SEND_EXITS.get(resp.status, EXIT_FAILURE)
    if code != EXIT_OK:
        _print_error(data if data is not None else f"HTTP {resp.status}")
        return code
    if args.reply and resp.status == 200:
        return _print_reply(data, args.json)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    status, data = _get(args, "/status", 10.0)
    if status != 200 or not isinstance(data, dict):
        _print_error(data)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    a, u = data.get("agentapi", {}), data.get("uploads", {})
    coderd = (data.get("coderd") or {}).get("version")
    uploads = (f"{u.get('state')}, last success {u.get('last_success_at') or 'never'}, "
               f"{u.get('consecutive_failures')} failures in a row"
               + (f", coderd {coderd}" if coderd else "")
               if u.get("enabled") else f"off ({u.get('disabled_reason')})")
    kind = ", ".join(str(a[k]) for k in ("agent_type", "transport") if a.get(k))
    lines = [
        f"agent-sidecar {data.get('version')}, up {data.get('uptime_s', 0):.0f}s"
        + (", shutting down" if data.get("shutting_down") else ""),
        f"agentapi  {a.get('url')}: {'connected' if a.get('connected') else 'NOT connected'}"
        + (f" ({kind})" if kind else "")
        + f", agent {a.get('agent_status')}, {a.get('messages')} messages",
        f"uploads   {uploads}",
        f"relay     {data.get('relay', {}).get('socket')}, "
        f"{data.get('relay', {}).get('queue_length', 0)} waiting",
    ]
    if data.get("sink", {}).get("path"):
        sink = data["sink"]
        lines.append(f"sink      {sink['path']}" + (f" (error: {sink['error']})"
                                                    if sink.get("error") else ""))
    print("\n".join(shown(line) for line in lines))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    bad = "not alive" if args.live else "unhealthy"
    try:
        status, data = _get(args, "/livez" if args.live else "/healthz", 5.0)
    except client.ClientError as exc:
        print(f"{bad}: {shown(exc)}")
        return EXIT_FAILURE
    reasons = data.get("reasons") if isinstance(data, dict) else None
    if status == 200:
        good = "alive" if args.live else "healthy"
        print("degraded: " + "; ".join(map(shown, reasons)) if reasons else good)
        return EXIT_OK
    detail = "; ".join(map(str, reasons)) if reasons else (
        data.get("message") if isinstance(data, dict) and data.get("message") else
        f"HTTP {status}")
    print(f"{bad}: {shown(detail)}")
    return EXIT_FAILURE


def _cmd_config(args: argparse.Namespace) -> int:
    import asyncio

    from agent_sidecar import config, logs
    from agent_sidecar.config import ConfigError, Settings
    from agent_sidecar.pipeline import StartupError, check

    loaded = _load(args)
    try:  # run's own checks, so that `config` refuses what `run` would refuse
        asyncio.run(check(loaded.settings))
    except StartupError as exc:
        raise ConfigError(str(exc)) from None
    rows = []
    for name in Settings.model_fields:
        value = getattr(loaded.settings, name)
        shown = config.SECRET_MASK if name == "coder_token" and value else value
        rows.append((name, "" if shown is None else logs.redact_url(str(shown)),
                     loaded.origins[name]))
    if args.json:
        print(json.dumps({n: {"value": v, "source": o} for n, v, o in rows}, indent=2))
        return EXIT_OK
    width = max(len(r[0]) for r in rows)
    vwidth = min(48, max(len(r[1]) for r in rows))
    for name, value, origin in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {origin}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from agent_sidecar.demo import demo

    async def main() -> int:
        stop = asyncio.Event()
        _install_signals(stop.set, stop.set, None)
        return await demo(once=args.once, directory=args.dir, stop=stop)

    return asyncio.run(main())


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "snapshot": _cmd_snapshot,
    "send": _cmd_send,
    "status": _cmd_status,
    "check": _cmd_check,
    "config": _cmd_config,
    "demo": _cmd_demo,
}


_LIGHT = frozenset({"send", "status", "check"})
_HEAVY = frozenset(_COMMANDS) - _LIGHT


def _refused(exc: Exception, args: argparse.Namespace) -> int:
    """Exit code 2 for a bad configuration or a start-up refusal, said by `_say_refused`;
    anything else propagates. Only the heavy commands raise these, so their modules are
    loaded by then."""
    from agent_sidecar.config import ConfigError
    from agent_sidecar.daemon import StartupError

    if isinstance(exc, ConfigError):
        _say_refused("config_invalid", str(exc).splitlines(), _log_format(args.command, args))
        return EXIT_CONFIG
    if isinstance(exc, StartupError):
        _say_refused("start_refused", [f"cannot start: {exc}"],
                     _log_format(args.command, args))
        return EXIT_CONFIG
    raise exc


def _log_format(command: str, args: argparse.Namespace | None) -> str:
    """The format `command`'s refusal is written in. "json" only for `run` (whose stderr is
    the log stream; the other commands print for people) when that is its log format, as
    far as it can be known when the settings themselves may be what is wrong: `log_format`
    from the flag, the environment, the config file, or the default, by the settings'
    precedence, with "auto" resolved as logs.configure resolves it. Else "console"."""
    from agent_sidecar import config
    from agent_sidecar.config import Settings

    if command != "run":
        return "console"

    value = getattr(args, "log_format", None)
    if value is None and (found := config.from_env("log_format")):
        value = found[1]
    if value is None:
        value = _file_value(getattr(args, "config", None) or os.environ.get(config.CONFIG_ENV),
                            "log_format")
    if value is None:
        value = Settings.model_fields["log_format"].default
    if value == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return value if value in ("json", "console") else "console"


def _file_value(path: object, name: str) -> object:
    """`name` in the TOML file at `path`, or None when there is none or it cannot be read
    (the refusal being written may be about that very file)."""
    if not path:
        return None
    import tomllib

    try:
        with open(str(path), "rb") as fh:
            return tomllib.load(fh).get(name)
    except (OSError, ValueError):
        return None


def _say_refused(event: str, problems: list[str], fmt: str, *,
                 plain: list[str] | None = None, **fields: str) -> None:
    """Say on stderr why a heavy command will not go on: one line per problem, as a JSON
    line like the logs' (`event`, `level`, `timestamp`, `error`, `fields`) when `fmt` is
    "json", else `agent-sidecar: PROBLEM` (or the lines of `plain`). When stderr is
    journald's, every line carries the error priority (`<3>`), so `journalctl -p warning`
    shows why a unit failed. Redacted as log lines are."""
    from datetime import UTC, datetime

    from agent_sidecar import logs

    if fmt == "json":
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lines = [json.dumps({"event": event, "level": "error", "timestamp": stamp,
                             "error": problem, **fields}) for problem in problems]
        lines = [logs.redactor.scrub_escaped(line) for line in lines]
    else:
        lines = plain if plain is not None else [f"agent-sidecar: {p}" for p in problems]
        lines = [logs.redactor.scrub(line) for line in lines]
    # logs.py's own test of whether stderr is journald's (JOURNAL_STREAM names its inode).
    prefix = "<3>" if logs._journald(sys.stderr) else ""
    for line in lines:
        print(prefix + line, file=sys.stderr)


def _output_failed(command: str, exc: OSError) -> int:
    """stdout could not take the output (a full disk, a quota): one line, not a
    traceback. Only `send` had delivered something by then, and must say so."""
    why = exc.strerror or str(exc)
    if command == "send":
        print(f"agent-sidecar: the input was delivered, but its answer could not be written: "
              f"{why}; do not resend it", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"agent-sidecar: cannot write the output: {why}", file=sys.stderr)
    return EXIT_FAILURE


def _pipe_closed() -> int:
    """Our reader left (`| head -1`): say nothing more, as programs the SIGPIPE ends do.
    stdout and stderr point at /dev/null from here, so the interpreter's own flush at
    exit (which would fail on the closed pipe again) has nowhere to fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        # A stream without a descriptor (a test's StringIO) has nothing to redirect.
        # Not contextlib.suppress: the light commands do not import contextlib.
        try:  # noqa: SIM105
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass
    os.close(devnull)
    return EXIT_PIPE_CLOSED


def main(argv: Sequence[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        # argparse would name every unrecognized argument, values included: one may be
        # the token. Only option names are shown.
        parser.error(_unrecognized(extras))
    try:
        code = _COMMANDS[args.command](args)
        # A closed pipe shows at the flush; left to the interpreter's exit, it would be
        # an "Exception ignored" traceback. (No stdout at all, `>&-`: print writes nothing.)
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        code = _pipe_closed()
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        code = _output_failed(args.command, exc)
    except client.ClientError as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except paths.ConfigFileError as exc:
        # A light command's socket comes from a file `run` would refuse: say so, as `run`
        # does, rather than fall back to another socket (another daemon, or nobody).
        print(f"agent-sidecar: {shown(exc)}", file=sys.stderr)
        code = EXIT_CONFIG
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception as exc:
        if args.command in _LIGHT:
            raise
        code = _refused(exc, args)
    sys.exit(code)
