"""``python -m medflower.cli``: the ``medflower`` command."""

from __future__ import annotations

import sys

from medflower.cli.commands import main

sys.exit(main())
