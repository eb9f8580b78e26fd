"""`python -m mininp_segformer ...`: the same as the `mininp-segformer` command (see cli.py)."""

from .tools.cli import main

raise SystemExit(main())
