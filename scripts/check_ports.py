#!/usr/bin/env python3
"""The name users know from the seed project: a thin wrapper around `clip-hpc check-ports`.

python scripts/check_ports.py --connection-file ~/.clip-hpc/connections/NAME.json
python scripts/check_ports.py --port 8765 --token TOKEN
python scripts/check_ports.py --connection-file FILE --server      # on the compute node itself
"""

from __future__ import annotations

import sys

from clip_hpc.cli import main

if __name__ == "__main__":
    sys.exit(main(["check-ports", *sys.argv[1:]]))
