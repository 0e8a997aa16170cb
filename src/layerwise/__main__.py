"""``python -m layerwise``: the same as the ``layerwise`` command."""

from layerwise.cli import main

raise SystemExit(main())
