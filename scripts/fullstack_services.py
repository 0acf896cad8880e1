"""Start the team-server stack without Docker; the code is the ``fullstack`` package next to this file.

    python scripts/fullstack_services.py            # start everything, print the URLs; Ctrl-C stops it
    python scripts/fullstack_services.py --no-worker --ui
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -P` / `-I`
    from fullstack.cli import main

    sys.exit(main())
