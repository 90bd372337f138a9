"""`python -m vtr.cli`: the `vtr` command."""
from . import main

raise SystemExit(main())
