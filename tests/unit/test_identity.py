"""Peer identities: the id announced in a record is bound to the key that signs it."""

from __future__ import annotations

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID

from swarm.dht import _owned_by, load_identity, owner_marker, owner_peer_id, record_subkey


def test_identity_file_is_created_once_and_reused(tmp_path):
    path = str(tmp_path / "peer.key")
    first_path, first = load_identity(path)
    second_path, second = load_identity(path)
    assert first_path == second_path == path
    assert owner_marker(first) == owner_marker(second)


def test_owner_key_derives_the_libp2p_peer_id(tmp_path):
    path, key = load_identity(str(tmp_path / "peer.key"))
    with open(path, "rb") as f:
        expected = PeerID.from_identity(f.read()).to_base58()
    public = RSASignatureValidator._PUBLIC_KEY_RE.search(owner_marker(key)).group(1)
    assert owner_peer_id(public) == expected


def test_records_count_only_under_their_own_peer_id(tmp_path):
    path, key = load_identity(str(tmp_path / "a.key"))
    _, other = load_identity(str(tmp_path / "b.key"))
    with open(path, "rb") as f:
        peer_id = PeerID.from_identity(f.read()).to_base58()
    assert _owned_by(record_subkey(peer_id, owner_marker(key)), peer_id)
    assert not _owned_by(record_subkey(peer_id, owner_marker(other)), peer_id)  # someone else's key in my name
    assert not _owned_by(peer_id, peer_id)  # unsigned
    assert not _owned_by(record_subkey("Qmsomeoneelse", owner_marker(key)), peer_id)
    assert not _owned_by(b"x[owner:not a key]", "x")
