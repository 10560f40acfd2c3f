"""``python -m sahc_core``: the command-line interface (see sahc_core.cli.main)."""
from sahc_core.cli.main import main

raise SystemExit(main())
