"""Shared pieces of the benchmarks: machine and version info, statistics, peak RSS, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict[str, str]:
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {name: installed(name) for name in ("torch", "transformers", "hivemind", "bitsandbytes", "swarm-llm")}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_rss_mib(pid: int) -> dict[str, float]:
    """Peak resident memory (VmHWM) of a process and of its children now alive (DHT child, p2pd)."""
    def hwm(p: int) -> float:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    children = psutil.Process(pid).children(recursive=True)
    result = {"main": round(hwm(pid), 1)}
    for child in children:
        try:
            result[f"{child.name()}-{child.pid}"] = round(hwm(child.pid), 1)
        except (FileNotFoundError, psutil.Error):
            pass
    return result


def emit(name: str, result: dict[str, Any], out_dir: str | None) -> None:
    """Print the result as JSON and, with out_dir, also write it to OUT_DIR/NAME.json."""
    text = json.dumps(result, indent=2)
    print(text)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"{name}.json").write_text(text + "\n")
    sys.stdout.flush()
