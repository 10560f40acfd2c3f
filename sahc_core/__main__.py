"""``python -m sahc_core``: the command-line interface (see sahc_core.cli)."""
from sahc_core.cli import main

raise SystemExit(main())
