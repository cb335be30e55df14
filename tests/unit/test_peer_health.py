"""The peer's health file and its probe (swarm.server.health): ready only when online and fresh."""

from __future__ import annotations

import json
import time

from swarm.server.health import check, main, write_health


def test_ready_only_when_online_and_fresh(tmp_path):
    path = str(tmp_path / "health.json")
    write_health(path, "online", 0, 15)
    assert check(path, 30) == (True, "online blocks=0:15 written 0 s ago")
    assert main([path]) == 0
    assert check(path, 30, now=time.time() + 60)[0] is False  # a peer that stopped announcing
    assert "stale" in check(path, 30, now=time.time() + 60)[1]
    for state in ("joining", "draining", "offline"):
        write_health(path, state, 0, 15)
        assert check(path, 30)[0] is False and main([path]) == 1


def test_a_missing_or_garbled_file_is_not_ready(tmp_path):
    assert check(str(tmp_path / "absent.json"), 30)[0] is False
    garbled = tmp_path / "garbled.json"
    for content in ("{not json", json.dumps({"state": "online"}), json.dumps([1, 2]), ""):
        garbled.write_text(content)
        ready, text = check(str(garbled), 30)
        assert ready is False and text.startswith("unknown"), text
