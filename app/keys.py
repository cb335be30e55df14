"""The gateway's admin CLI for API keys and usage (the SQLite store of `app.keystore`, at GATEWAY_DB or --db).

    python -m app.keys create alice --rpm 60 --tpm 20000 --budget 1000000 --period month   # prints the key once
    python -m app.keys list
    python -m app.keys limits <id> --rpm 120 --max-concurrent 4     # 0 lifts a limit
    python -m app.keys revoke <id>
    python -m app.keys usage --by day --since 2026-11-01 --format csv

A running gateway sees every change on its next request.
"""

from __future__ import annotations

import argparse
import calendar
import csv
import dataclasses
import io
import json
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any

from app.keystore import KeyRecord, KeyStore, Limits, period_start
from app.settings import DEFAULT_DB

LIMIT_FIELDS = ("rpm", "tpm", "budget", "budget_period", "prompt_weight", "completion_weight", "max_concurrent")


def _date(text: str) -> float:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%d")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD, UTC)") from None


def _limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
    parser.add_argument("--tpm", type=int, help="tokens (prompt + completion) per minute (0: no limit)")
    parser.add_argument("--budget", type=float, help="cost units per period (0: no limit)")
    parser.add_argument("--period", dest="budget_period", choices=("day", "month"), help="the budget's period (UTC)")
    parser.add_argument("--prompt-weight", type=float, help="cost of a prompt token (default 1)")
    parser.add_argument("--completion-weight", type=float, help="cost of a completion token (default 1)")
    parser.add_argument("--max-concurrent", type=int, help="generations at once (0: no limit)")


def _limits(base: Limits, args: argparse.Namespace) -> Limits:
    given = {name: getattr(args, name) for name in LIMIT_FIELDS if getattr(args, name) is not None}
    for name in ("rpm", "tpm", "budget", "max_concurrent"):
        if given.get(name) == 0:
            given[name] = None
    return dataclasses.replace(base, **given)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=os.environ.get("GATEWAY_DB") or DEFAULT_DB, help="the store (GATEWAY_DB)")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="make a key; it is printed once, and stored only as a hash")
    create.add_argument("name")
    _limit_options(create)
    listing = commands.add_parser("list", help="the keys and their limits")
    listing.add_argument("--format", choices=("table", "json", "csv"), default="table")
    revoke = commands.add_parser("revoke", help="refuse a key from the next request on")
    revoke.add_argument("id")
    limits = commands.add_parser("limits", help="change a key's limits (those given)")
    limits.add_argument("id")
    _limit_options(limits)
    usage = commands.add_parser("usage", help="usage per key and period")
    usage.add_argument("--key", help="one key's id")
    usage.add_argument("--since", type=_date, default=0.0, help="from this UTC date (YYYY-MM-DD)")
    usage.add_argument("--until", type=_date, default=float("inf"), help="up to this UTC date, excluded")
    usage.add_argument("--by", choices=("day", "month", "all"), default="day", help="one line per key and ...")
    usage.add_argument("--format", choices=("table", "json", "csv"), default="table")
    return parser


def _key_row(record: KeyRecord) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "created": _iso(record.created),
            "revoked": _iso(record.revoked) if record.revoked else "", **dataclasses.asdict(record.limits)}


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def usage_report(store: KeyStore, key_id: str | None, since: float, until: float, by: str) -> list[dict[str, Any]]:
    """Per key and period: requests, tokens (prompt, completion, cached), cost, and requests that did not end ok."""
    names = {record.id: record.name for record in store.records()}
    lines: dict[tuple[str, str], dict[str, Any]] = {}
    for row in store.usage(key_id, since, until):
        period = "all" if by == "all" else time.strftime("%Y-%m-%d" if by == "day" else "%Y-%m",
                                                          time.gmtime(period_start(by, row.at)))
        line = lines.setdefault((row.key_id, period), {
            "key_id": row.key_id or "-", "name": names.get(row.key_id, ""), "period": period, "requests": 0,
            "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "cost": 0.0, "not_ok": 0})
        line["requests"] += 1
        line["prompt_tokens"] += row.prompt_tokens
        line["completion_tokens"] += row.completion_tokens
        line["cached_tokens"] += row.cached_tokens
        line["cost"] += row.cost
        line["not_ok"] += row.status != "ok"
    return sorted(lines.values(), key=lambda line: (line["period"], line["key_id"]))


def _print(rows: list[dict[str, Any]], fmt: str, out: io.TextIOBase | Any) -> None:
    if fmt == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
        return
    if not rows:
        return
    columns = list(rows[0])
    if fmt == "csv":
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(rows)
        return
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    for line in [[c.upper() for c in columns], *cells]:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    try:
        store = KeyStore(args.db)
    except (OSError, sqlite3.Error) as e:  # a directory, a corrupt file: said in one line
        sys.stderr.write(f"the key store {args.db} cannot be opened: {e}\n")
        return 1
    try:
        if args.command == "create":
            if not args.name.strip():
                sys.stderr.write("a key needs a name\n")
                return 2
            record, key = store.create(args.name, _limits(Limits(), args))
            out.write(f"id:  {record.id}\nkey: {key}\n(the key is shown once: it is stored only as a hash)\n")
        elif args.command == "list":
            _print([_key_row(record) for record in store.records()], args.format, out)
        elif args.command == "revoke":
            if not store.revoke(args.id):
                sys.stderr.write(f"no unrevoked key {args.id!r}\n")
                return 1
            out.write(f"revoked {args.id}\n")
        elif args.command == "limits":
            found = store.get(args.id)  # None also where its stored limits are invalid: set from the defaults
            if not store.set_limits(args.id, _limits(found.limits if found else Limits(), args)):
                sys.stderr.write(f"no key {args.id!r}\n")
                return 1
            if found is None:
                sys.stderr.write("its stored limits were invalid: those not given now are the defaults\n")
            _print([_key_row(record) for record in [store.get(args.id)] if record is not None], "table", out)
        else:
            _print(usage_report(store, args.key, args.since, args.until, args.by), args.format, out)
    except ValueError as e:  # a limit out of range
        sys.stderr.write(f"{e}\n")
        return 2
    except BrokenPipeError:  # `list | head`: the reader has what it wanted (stdout to /dev/null: no flush error)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
