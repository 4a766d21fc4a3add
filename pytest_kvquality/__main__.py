"""``python -m pytest_kvquality sweep|report|options-table``: see sweep/cli.py."""

import sys

from .sweep.cli import main

sys.exit(main())
