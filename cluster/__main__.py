"""``python -m cluster ...`` is the ``splitserve`` command (see cluster/cli.py)."""

import sys

from cluster.cli import main

sys.exit(main())
