"""``python -m npu_optim_compile``: see ``_cli.py``."""

import sys

from ._cli import main

sys.exit(main())
