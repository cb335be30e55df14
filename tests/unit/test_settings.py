"""Peer settings: CLI flags map 1:1 to fields, env fills in, bad values are refused, help shows defaults."""

from __future__ import annotations

import enum
from typing import Literal

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from swarm.cli import build_parser, parse_settings
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


def test_list_variables_take_plain_lists_or_json(monkeypatch):
    monkeypatch.setenv("SWARM_PEER_INITIAL_PEERS", "/ip4/a/tcp/1/p2p/QmA, /ip4/b/tcp/2/p2p/QmB")
    monkeypatch.setenv("SWARM_PEER_ALLOWED_CLIENTS", '["QmC"]')
    settings = PeerSettings()
    assert settings.initial_peers == ["/ip4/a/tcp/1/p2p/QmA", "/ip4/b/tcp/2/p2p/QmB"]
    assert settings.allowed_clients == ["QmC"]


@pytest.mark.parametrize("blocks", ["3", "a:b", "10:5", "0:31", "-1:4"])
def test_bad_block_ranges_are_refused(blocks):
    with pytest.raises(ValueError, match="--blocks"):
        PeerSettings(blocks=blocks).block_range(30)


def test_unknown_model_reference_is_explained():
    with pytest.raises(FileNotFoundError, match=r"neither a packaged model \(smollm2-135m-instruct, gemma3-270m\), "
                                                r"a local \*\.gguf file or directory nor a hub id"):
        resolve_model("./no/such/dir")


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class ToySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOY_")

    color: Color = Field(Color.RED, description="an enum")
    bits: Literal[4, 8] = Field(8, description="a literal of ints")
    mode: Literal["a", "b"] | None = Field(None, description="an optional literal")
    ports: list[int] = Field(default_factory=lambda: [1, 2], description="a list from a factory")
    verbose: bool = Field(False, description="a switch")
    share: float = Field(0.5, description="a 50% share")


def help_of(cls, flag: str) -> str:
    """The help of one flag as one line (argparse wraps it)."""
    text = " ".join(build_parser(cls, "prog", "").format_help().partition("options:")[2].split())
    return text[text.index(flag + " "):].split(" --")[0]


def test_help_shows_defaults_and_choices():
    help_text = build_parser(PeerSettings, "peer", "").format_help()
    assert "PydanticUndefined" not in help_text
    assert help_of(PeerSettings, "--initial-peers").endswith("multiaddrs of DHT nodes to join (default: [])")
    assert help_of(PeerSettings, "--device").startswith("--device {auto,cpu,cuda} where the blocks run")
    assert help_of(PeerSettings, "--quant").startswith("--quant {auto,none,int8,int4,nf4}")
    assert help_of(PeerSettings, "--model-id").count("(default:") == 1  # its description already says it
    assert help_of(ToySettings, "--color") == "--color {red,blue} an enum (default: 'red')"
    assert help_of(ToySettings, "--bits") == "--bits {4,8} a literal of ints (default: 8)"
    assert help_of(ToySettings, "--mode") == "--mode {a,b} an optional literal (default: None)"
    assert help_of(ToySettings, "--ports") == "--ports [PORTS ...] a list from a factory (default: [1, 2])"
    assert help_of(ToySettings, "--share") == "--share SHARE a 50% share (default: 0.5)"


def test_choices_and_types_are_parsed_and_others_refused(capsys):
    settings = parse_settings(ToySettings, "toy", "", ["--color", "blue", "--bits", "4", "--mode", "b",
                                                       "--ports", "7", "9", "--verbose"])
    assert (settings.color, settings.bits, settings.mode, settings.ports, settings.verbose) == (
        Color.BLUE, 4, "b", [7, 9], True)
    assert parse_settings(ToySettings, "toy", "", []) == ToySettings()
    for argv in (["--bits", "5"], ["--color", "green"], ["--ports", "x"]):
        with pytest.raises(SystemExit):
            parse_settings(ToySettings, "toy", "", argv)
        assert "invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(PeerSettings, "peer", "", ["--device", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err
    assert PeerSettings().kv_dtype == "float32"
    for kv in ("float16", "auto"):
        assert parse_settings(PeerSettings, "peer", "", ["--kv-dtype", kv]).kv_dtype == kv
    with pytest.raises(SystemExit):
        parse_settings(PeerSettings, "peer", "", ["--kv-dtype", "bfloat16"])
    assert "invalid choice: 'bfloat16'" in capsys.readouterr().err
    assert parse_settings(PeerSettings, "peer", "", ["--activations", "int8"]).activations == "int8"
    assert PeerSettings().activations == "float32"
    with pytest.raises(SystemExit):
        parse_settings(PeerSettings, "peer", "", ["--activations", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
