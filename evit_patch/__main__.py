"""``python -m evit_patch``: the same CLI as the ``evit-patch`` console script."""

import sys

from .cli import main

sys.exit(main())
