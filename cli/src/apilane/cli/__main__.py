"""`python -m apilane.cli …` is the same as `apilane …`."""

from apilane.cli.main import main

raise SystemExit(main())
