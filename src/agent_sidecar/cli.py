"""main(): subcommands, asyncio.run, logging setup and exit codes. Only this module exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import aiohttp

from agent_sidecar import __version__, config, logs
from agent_sidecar.config import ConfigError, Settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # bad configuration or usage: retrying will not help
EXIT_INTERRUPTED = 130

_DESCRIPTION = """\
Keeps Coder's task log snapshot fresh from agentapi's conversation, and relays input to
the agent over a private Unix socket.

Settings come from flags, then AGENT_SIDECAR_* environment variables (and Coder's own
CODER_AGENT_URL, CODER_AGENT_TOKEN, CODER_AGENT_TOKEN_FILE), then the TOML file given by
--config or AGENT_SIDECAR_CONFIG, then defaults. `agent-sidecar config` shows the result.
"""

_EPILOG = """\
exit codes: 0 ok, 1 failed, 2 bad configuration or usage, 130 interrupted twice.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The top level: its description has paragraphs of its own."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)


class _Wrapping(argparse.HelpFormatter):
    """Subcommands: one-paragraph descriptions, wrapped to the terminal."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34)


_METAVARS = {"agentapi_url": "URL", "coder_url": "URL", "coder_token_file": "PATH",
             "task_id": "UUID", "sink_dir": "DIR", "socket": "PATH", "log_format": "FORMAT",
             "log_level": "LEVEL", "metrics_addr": "HOST:PORT"}


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "settings", "Each is also an environment variable. The agent token is read only "
        "from CODER_AGENT_TOKEN or a token file: never from a flag, where any local user "
        "could read it.")
    group.add_argument("--config", type=Path, metavar="PATH",
                       help=f"TOML settings file (env {config.CONFIG_ENV})")
    for name, info in Settings.model_fields.items():
        if name == "coder_token":
            continue
        env = " or ".join(config.env_names(name))
        default = info.get_default(call_default_factory=True)
        shown = "" if default is None else f", default {default}"
        metavar = _METAVARS.get(name) or ("BYTES" if name.endswith("_bytes") else "SECONDS")
        group.add_argument(config.flag_name(name), dest=name, metavar=metavar,
                           help=f"{info.description} (env {env}{shown})")


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    fields = Settings.model_fields
    return {n: getattr(args, n) for n in fields if getattr(args, n, None) is not None}


def _socket_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, metavar="PATH",
                        help="relay socket (default: AGENT_SIDECAR_SOCKET, else "
                        f"{config.default_socket_path()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-sidecar", description=_DESCRIPTION,
                                     epilog=_EPILOG, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"agent-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon: follow agentapi, upload, relay",
                         description="Follow agentapi, keep Coder's snapshot fresh (or the "
                         "sink, without Coder), and serve the relay socket until SIGTERM or "
                         "Ctrl+C. SIGHUP reloads the config; a second Ctrl+C exits at once.",
                         formatter_class=_Wrapping)
    _settings_flags(run)

    snap = sub.add_parser("snapshot", help="pack agentapi's conversation once",
                          description="Read GET /messages once and print the packed snapshot "
                          "body, or write it with --output. With --upload, send it to Coder "
                          "with retries: a drop-in for the agentapi module's shutdown script.",
                          formatter_class=_Wrapping)
    snap.add_argument("--output", "-o", type=Path, metavar="FILE",
                      help="write the body here instead of stdout")
    snap.add_argument("--upload", action="store_true", help="upload it to Coder")
    snap.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                      help="give up on the upload after this long, retries included (30)")
    _settings_flags(snap)

    send = sub.add_parser("send", help="send input to the agent through the relay",
                          description="Deliver TEXT to the agent. A user message waits until "
                          "the agent is ready; --raw sends keystrokes at once.",
                          formatter_class=_Wrapping)
    send.add_argument("text", metavar="TEXT", help="the input, or - to read it from stdin")
    send.add_argument("--raw", action="store_true",
                      help="send keystrokes as they are (e.g. $'\\x1b' for Escape), no waiting")
    send.add_argument("--wait", type=float, metavar="SECONDS",
                      help="how long to wait for the agent to be ready (server default 30)")
    _socket_arg(send)

    status = sub.add_parser("status", help="show what the running daemon is doing",
                            formatter_class=_Wrapping)
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    _socket_arg(status)

    check = sub.add_parser("check", help="health check: exit 0 if healthy, 1 if not",
                           description="One line, and exit 0 when healthy, 1 otherwise. "
                           "Suits a Docker HEALTHCHECK.", formatter_class=_Wrapping)
    _socket_arg(check)

    cfg = sub.add_parser("config", help="print the effective settings and their sources",
                         description="Print every setting, its value and where it came from. "
                         "Exit 2 if the configuration is invalid (usable as ExecStartPre=).",
                         formatter_class=_Wrapping)
    cfg.add_argument("--json", action="store_true", help="print JSON")
    _settings_flags(cfg)

    demo = sub.add_parser("demo", help="see it work: a simulated agent, the sidecar, a sink",
                          description="Start a simulated agentapi on loopback, run the full "
                          "sidecar against it with snapshots going to a sink directory, send "
                          "a prompt through the relay, and print each snapshot written.",
                          formatter_class=_Wrapping)
    demo.add_argument("--once", action="store_true", help="one scripted exchange, then exit 0")
    demo.add_argument("--dir", type=Path, metavar="DIR",
                      help="where the socket and the sink go (default: a new temporary dir)")
    return parser


# -- commands -------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> config.Loaded:
    return config.load(_flags(args), config_file=args.config)


def _setup_logs(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format)
    if settings.coder_token:
        logs.redactor.add(settings.coder_token.get_secret_value())


def _cmd_run(args: argparse.Namespace) -> int:
    from agent_sidecar.daemon import Controls, serve
    from agent_sidecar.sdnotify import Notifier

    loaded = _load(args)
    _setup_logs(loaded.settings)

    def reread() -> Settings:
        new = config.load(_flags(args), config_file=loaded.config_file).settings
        # Logging belongs to main(), not to serve(): the level is applied here.
        logs.configure(new.log_level, loaded.settings.log_format)
        return new

    async def main() -> int:
        controls = Controls()
        _install_signals(controls.shutdown.set, controls.force.set, controls.reload.set)
        return await serve(loaded.settings, controls, reload_settings=reread,
                           notifier=Notifier())

    return asyncio.run(main())


def _install_signals(shutdown: Callable[[], None], force: Callable[[], None],
                     reload: Callable[[], None] | None) -> None:
    """Handlers only set state: the first Ctrl+C or SIGTERM asks for the graceful shutdown,
    a second Ctrl+C forces it (the final upload is cut short, exit 130)."""
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
    from agent_sidecar.oneshot import snapshot

    loaded = _load(args)
    _setup_logs(loaded.settings)
    return asyncio.run(snapshot(loaded.settings, output=args.output, upload=args.upload,
                                timeout_s=args.timeout))


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    env = os.environ.get("AGENT_SIDECAR_SOCKET")
    return Path(env) if env else config.default_socket_path()


async def _call(path: Path, method: str, url: str, body: dict[str, Any] | None = None,
                timeout_s: float = 10.0) -> tuple[int, Any]:
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=connector) as session, session.request(
        method, f"http://sidecar{url}", json=body,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as resp:
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, {"message": raw.decode("utf-8", "replace")}


def _client(path: Path, method: str, url: str, body: dict[str, Any] | None = None,
            timeout_s: float = 10.0) -> tuple[int, Any]:
    try:
        return asyncio.run(_call(path, method, url, body, timeout_s))
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise _Unreachable(f"cannot reach the sidecar at {path}: {exc.__class__.__name__}; "
                           "is `agent-sidecar run` running (see --socket)?") from None
    except TimeoutError:
        raise _Unreachable(f"the sidecar at {path} did not answer in {timeout_s:g}s") from None


class _Unreachable(Exception):
    pass


def _print_error(data: Any) -> None:
    if isinstance(data, dict):
        message = data.get("message") or "request failed"
        detail = data.get("detail")
        print(f"agent-sidecar: {message}" + (f" ({detail})" if detail else ""), file=sys.stderr)
    else:
        print(f"agent-sidecar: {data}", file=sys.stderr)


def _cmd_send(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    body: dict[str, Any] = {"input": text, "type": "raw" if args.raw else "user"}
    if args.wait is not None:
        body["wait_s"] = args.wait
    wait = args.wait if args.wait is not None else 30.0
    # agentapi's POST blocks up to ~18 s after the wait; leave room for it.
    status, data = _client(_socket_path(args), "POST", "/send", body, timeout_s=wait + 60)
    if status == 204:
        return EXIT_OK
    _print_error(data)
    return EXIT_FAILURE


def _cmd_status(args: argparse.Namespace) -> int:
    status, data = _client(_socket_path(args), "GET", "/status")
    if status != 200:
        _print_error(data)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    a, u = data.get("agentapi", {}), data.get("uploads", {})
    uploads = (f"{u.get('state')}, last success {u.get('last_success_at') or 'never'}, "
               f"{u.get('consecutive_failures')} failures in a row"
               if u.get("enabled") else f"off ({u.get('disabled_reason')})")
    lines = [
        f"agent-sidecar {data.get('version')}, up {data.get('uptime_s', 0):.0f}s"
        + (", shutting down" if data.get("shutting_down") else ""),
        f"agentapi  {a.get('url')}: {'connected' if a.get('connected') else 'NOT connected'}, "
        f"agent {a.get('agent_status')}, {a.get('messages')} messages",
        f"uploads   {uploads}",
        f"relay     {data.get('relay', {}).get('socket')}, "
        f"{data.get('relay', {}).get('queue_length', 0)} waiting",
    ]
    if data.get("sink", {}).get("path"):
        sink = data["sink"]
        lines.append(f"sink      {sink['path']}" + (f" (error: {sink['error']})"
                                                    if sink.get("error") else ""))
    print("\n".join(lines))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        status, data = _client(_socket_path(args), "GET", "/healthz", timeout_s=5)
    except _Unreachable as exc:
        print(f"unhealthy: {exc}")
        return EXIT_FAILURE
    if status == 200:
        reasons = data.get("reasons") if isinstance(data, dict) else None
        print("degraded: " + "; ".join(map(str, reasons)) if reasons else "healthy")
        return EXIT_OK
    reasons = data.get("reasons") if isinstance(data, dict) else None
    print("unhealthy: " + ("; ".join(map(str, reasons)) if reasons else str(data)))
    return EXIT_FAILURE


def _cmd_config(args: argparse.Namespace) -> int:
    from agent_sidecar.pipeline import StartupError, check

    loaded = _load(args)
    try:
        asyncio.run(check(loaded.settings))  # what `run` checks before it starts
    except StartupError as exc:
        raise ConfigError(str(exc)) from None
    rows = []
    for name in Settings.model_fields:
        value = getattr(loaded.settings, name)
        shown = config.SECRET_MASK if name == "coder_token" and value else value
        rows.append((name, "" if shown is None else str(shown), loaded.origins[name]))
    if args.json:
        print(json.dumps({n: {"value": v, "source": o} for n, v, o in rows}, indent=2))
        return EXIT_OK
    width = max(len(r[0]) for r in rows)
    vwidth = min(48, max(len(r[1]) for r in rows))
    for name, value, origin in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {origin}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
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


def main(argv: Sequence[str] | None = None) -> NoReturn:
    from agent_sidecar.daemon import StartupError

    args = build_parser().parse_args(argv)
    try:
        code = _COMMANDS[args.command](args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"agent-sidecar: {line}", file=sys.stderr)
        code = EXIT_CONFIG
    except StartupError as exc:
        print(f"agent-sidecar: cannot start: {exc}", file=sys.stderr)
        code = EXIT_CONFIG
    except _Unreachable as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    sys.exit(code)
