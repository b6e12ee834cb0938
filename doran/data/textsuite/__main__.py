"""``python -m doran.data.textsuite summary | export``: see ``cli.main``."""

import sys

from .cli import main

sys.exit(main())
