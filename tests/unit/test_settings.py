"""Peer settings: CLI flags map 1:1 to fields, env fills in, bad values are refused."""

from __future__ import annotations

import pytest

from swarm.cli import parse_settings
from swarm.model.source import resolve_model
from swarm.server.settings import PeerSettings


def test_flags_env_and_defaults(monkeypatch):
    monkeypatch.setenv("SWARM_PEER_MAX_SESSIONS", "7")
    settings = parse_settings(PeerSettings, "peer", "", ["--blocks", "3:9", "--initial-peers", "/ip4/a", "/ip4/b",
                                                         "--port", "4000", "--idle-timeout", "2.5"])
    assert settings.block_range(30) == (3, 9)
    assert settings.initial_peers == ["/ip4/a", "/ip4/b"]
    assert (settings.port, settings.idle_timeout, settings.max_sessions) == (4000, 2.5, 7)
    assert settings.host == "127.0.0.1"
    assert PeerSettings().block_range(30) is None  # the peer places itself
    assert PeerSettings(blocks="all").block_range(30) == (0, 30)


@pytest.mark.parametrize("blocks", ["3", "a:b", "10:5", "0:31", "-1:4"])
def test_bad_block_ranges_are_refused(blocks):
    with pytest.raises(ValueError, match="--blocks"):
        PeerSettings(blocks=blocks).block_range(30)


def test_unknown_model_reference_is_explained():
    with pytest.raises(FileNotFoundError, match="neither the default model, a local directory nor a hub id"):
        resolve_model("./no/such/dir")
