"""A peer's health for a process supervisor: `python -m swarm.server.health FILE [--max-age SECONDS]`.

A peer started with `--health-file FILE` rewrites it (atomically) at each DHT announcement with its state (`joining`
while it loads blocks, `online`, `draining` while it moves, `offline` on shutdown), its blocks and the time. The probe
reads it, prints the state and exits 0 when the peer is online and the file is fresh (written within `--max-age`
seconds: a peer that hangs or died stops rewriting it), 1 otherwise: a container HEALTHCHECK or a readiness probe
with no network call and nothing to parse but this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence


def write_health(path: str, state: str, start: int, end: int) -> None:
    """Replace the health file in one rename (a reader never sees half of it)."""
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, prefix=".health-") as out:
        json.dump({"state": state, "blocks": [start, end], "written_at": time.time()}, out)
    os.replace(out.name, path)


def check(path: str, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """(ready, what to print) of the health file at `path`."""
    try:
        with open(path) as file:
            data = json.load(file)
        state, written, blocks = str(data["state"]), float(data["written_at"]), data["blocks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"unknown: no readable health file at {path} ({type(e).__name__})"
    age = (time.time() if now is None else now) - written
    text = f"{state} blocks={blocks[0]}:{blocks[1]} written {age:.0f} s ago"
    if age > max_age:
        return False, f"stale: {text} (more than {max_age:.0f} s: the peer stopped announcing)"
    return state == "online", text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.server.health", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the peer's --health-file")
    parser.add_argument("--max-age", type=float, default=30.0,
                        help="seconds after which the file is stale (default 30: six announcement periods of 5 s)")
    args = parser.parse_args(argv)
    ready, text = check(args.file, args.max_age)
    print(text)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
