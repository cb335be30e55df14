"""Run a peer: `python -m swarm.server --model MODEL --blocks START:END --initial-peers MADDR [MADDR ...]`.

Every flag also reads from SWARM_PEER_<FLAG>; `--help` lists them.
"""

from __future__ import annotations

import logging
import sys

from swarm.cli import configure_logging, parse_settings
from swarm.local_socket import BadDirectory
from swarm.server.peer import run_peer
from swarm.server.settings import PeerSettings
from swarm.server.sharing import SourceMismatch


def main() -> None:
    settings = parse_settings(PeerSettings, "python -m swarm.server", "Serve a span of a model's blocks.")
    configure_logging(settings.log_level)
    try:
        run_peer(settings)
    except (SourceMismatch, BadDirectory) as e:  # an operator's mistake: said plainly, without a traceback
        logging.getLogger("swarm.server").error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
