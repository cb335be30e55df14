"""Large language models served by a swarm of peers over hivemind: peers host spans of blocks, clients route."""

__version__ = "0.1.0"
