"""Peer server: host a span of blocks and the KV cache of every session through it."""
