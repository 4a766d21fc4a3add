"""``python -m pytest_kvquality sweep|report|merge|options-table``: see cli.py."""

import sys

from .cli import main

sys.exit(main())
