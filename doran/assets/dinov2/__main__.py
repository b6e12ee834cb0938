"""``python -m doran.assets.dinov2 convert | ensure | check | probe``."""

import sys

from . import main

sys.exit(main())
