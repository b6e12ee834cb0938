"""``python -m doran.data.textsuite``: see ``main``."""

import sys

from . import main

sys.exit(main())
