"""Drive the stand-ins' control API (deploy/test/standins_service.py) from the test script.

Standard library only: it runs with the host's python3, inside the container's network
namespace when the stand-ins run under systemd-nspawn (`nsenter --net`). It prints one plain
value per command, for the shell, and exits 1 with what the stand-ins saw when a wait fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

HTTP_MARGIN_S = 5.0


def call(base: str, method: str, path: str, body: dict[str, Any] | None = None,
         timeout_s: float = 10.0) -> tuple[int, Any]:
    if not base.startswith("http://"):
        raise SystemExit(f"ctl: the control API is plain http on loopback, not {base}")
    data = None if body is None else json.dumps(body).encode()
    # S310: the scheme is checked just above.
    request = urllib.request.Request(base + path, data=data, method=method,  # noqa: S310
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_ready(base: str, timeout_s: float) -> None:
    """Until the control API answers: the stand-ins may still be starting (a container)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, _ = call(base, "GET", "/ready", timeout_s=1.0)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"ctl: the stand-ins at {base} did not answer within {timeout_s:g}s")
        time.sleep(0.1)  # polling a process we cannot get an event from


def waited(base: str, path: str, query: dict[str, str], timeout_s: float) -> Any:
    query = {**query, "timeout_s": str(timeout_s)}
    status, state = call(base, "GET", f"{path}?{urllib.parse.urlencode(query)}",
                         timeout_s=timeout_s + HTTP_MARGIN_S)
    if status != 200:
        sys.exit(f"ctl: {path} {query} not reached in {timeout_s:g}s; the stand-ins saw:\n"
                 + json.dumps(state, indent=1))
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3286", help="the control API")
    parser.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ready", help="wait until the stand-ins answer")
    add = sub.add_parser("add", help="add a message; prints the message count")
    add.add_argument("role", choices=["user", "agent"])
    add.add_argument("content")
    sub.add_parser("drop", help="cut every /events stream; prints how many were cut")
    sub.add_parser("messages", help="print the number of messages in the conversation")
    sub.add_parser("uploads", help="print the number of uploads coderd received")
    sub.add_parser("state", help="print everything the stand-ins know, as JSON")
    received = sub.add_parser("wait-received", help="wait until agentapi accepted TEXT")
    received.add_argument("text")
    stored = sub.add_parser("wait-stored", help="wait until coderd holds the conversation "
                            "from an upload at or after --after; prints the uploads so far")
    stored.add_argument("--after", type=float, default=0.0, metavar="UNIX_TIME")
    args = parser.parse_args()
    base = args.url.rstrip("/")

    if args.command == "ready":
        wait_ready(base, args.timeout)
    elif args.command == "add":
        _, answer = call(base, "POST", "/messages", {"role": args.role, "content": args.content})
        print(answer["messages"])
    elif args.command == "drop":
        _, answer = call(base, "POST", "/drop", {})
        print(answer["cut"])
    elif args.command in ("messages", "uploads", "state"):
        _, state = call(base, "GET", "/state")
        if args.command == "messages":
            print(state["agentapi"]["messages"])
        elif args.command == "uploads":
            print(len(state["coderd"]["uploads"]))
        else:
            print(json.dumps(state, indent=1))
    elif args.command == "wait-received":
        waited(base, "/wait/received", {"text": args.text}, args.timeout)
    elif args.command == "wait-stored":
        state = waited(base, "/wait/stored", {"after": repr(args.after)}, args.timeout)
        print(len(state["coderd"]["uploads"]))


if __name__ == "__main__":
    main()
