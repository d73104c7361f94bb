"""``python -m chestxray``: see :mod:`chestxray.cli`."""
from chestxray.cli import main

raise SystemExit(main())
