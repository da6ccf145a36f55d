"""``python -m remotedialer_py``: the same as the ``remotedialer-py`` command."""

import sys

from .cli import main

sys.exit(main())
