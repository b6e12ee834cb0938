"""``python -m doran.data.imagesuite table | export DIR``: see ``cli.main``."""

import sys

from .cli import main

sys.exit(main())
