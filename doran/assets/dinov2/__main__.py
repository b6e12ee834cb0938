"""``python -m doran.assets.dinov2 convert | ensure | check | probe``: see ``cli.main``."""

import sys

from .cli import main

sys.exit(main())
