"""tailcallctl events: the handlers' events, for people (one line each) or for scripts (--json:
one JSON object per line).  Without -f the daemon's latest events are printed and the command
ends; with -f the last few are printed and new ones follow until Ctrl-C.

What a follower misses is never silent: the daemon tells it how many events it dropped for
it (it did not read fast enough) and how many the kernel lost (the ring buffer was full); both
are printed on stderr (and as JSON lines with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .client import Client
from .protocol import EventRecord, EventsResult

Printable = Callable[[str], str]


def request(args: argparse.Namespace) -> dict[str, Any]:
    return {"slot": args.slot, "hook": "exit" if args.exit else None, "follow": args.follow or None,
            "last": args.lines}


def line(event: dict[str, Any], printable: Printable) -> str:
    """One event as a person reads it: time, slot, comm[pid], uid, then the message or fields."""
    e = EventRecord.model_validate(event)
    when = datetime.fromtimestamp(e.time_ns / 1e9).strftime("%H:%M:%S.%f")
    where = e.syscall + (":exit" if e.hook == "exit" else "")
    what = e.message if e.message is not None else _fields(e.fields)
    compat = " (32-bit)" if e.compat else ""
    return printable(f"{when} {where} {e.comm}[{e.pid}] uid {e.uid}{compat}: {what}")


def _fields(fields: Any) -> str:
    if isinstance(fields, dict):
        return " ".join(f"{k}={json.dumps(v) if isinstance(v, (str, list, dict)) else v}" for k, v in fields.items())
    return json.dumps(fields)


def notice(message: dict[str, Any]) -> str | None:
    """What a notice line of the stream says, for people; None for an event."""
    if "dropped" in message:
        return f"{message['dropped']} events dropped: {message.get('reason', '')}"
    if "lost" in message:
        where = message.get("syscall", "?") + (":exit" if message.get("hook") == "exit" else "")
        return f"{message['lost']} events of {where} lost in the kernel: {message.get('reason', '')}"
    return None


NOTICES = (b'{"dropped"', b'{"lost"')  # how a notice line starts (an event's never does)


def run(client: Client, args: argparse.Namespace, printable: Printable) -> int:
    fields = {k: v for k, v in request(args).items() if v is not None}
    raw = client.call("events", **fields)
    result = EventsResult.model_validate(raw)
    try:
        for event in raw["events"]:
            print(json.dumps(event) if args.json else line(event, printable))
        sys.stdout.flush()
        if result.following:
            client.settimeout(None)  # a quiet slot is not a dead daemon
            (_pass_through if args.json else _follow)(client, printable)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # events | head
        sys.stdout = None  # type: ignore[assignment]  # no flush at exit of a closed pipe
    return 0


def _follow(client: Client, printable: Printable) -> None:
    for message in client.stream():
        said = notice(message)
        if said is not None:
            print(f"tailcallctl: {printable(said)}", file=sys.stderr)
        else:
            print(line(message, printable))
        sys.stdout.flush()


def _pass_through(client: Client, printable: Printable) -> None:
    """--json: the daemon's lines are the output already (one EventRecord, or notice, per line):
    written on unparsed, so that tailcallctl keeps up with the daemon.  Notices are also said
    on stderr."""
    out = sys.stdout.buffer
    tail = b""
    for chunk in client.chunks():
        out.write(chunk)
        out.flush()
        data = tail + chunk
        cut = data.rfind(b"\n") + 1
        whole, tail = data[:cut], data[cut:]
        if NOTICES[0] in whole or NOTICES[1] in whole:
            for text in whole.splitlines():
                if text.startswith(NOTICES):
                    said = notice(json.loads(text))
                    print(f"tailcallctl: {printable(said or '')}", file=sys.stderr)
