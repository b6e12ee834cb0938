"""``python -m doran.data.imagesuite``: see ``main``."""

import sys

from . import main

sys.exit(main())
