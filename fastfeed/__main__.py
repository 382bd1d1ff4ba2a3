"""``python -m fastfeed`` runs the command line."""

from fastfeed.cli import main

raise SystemExit(main())
