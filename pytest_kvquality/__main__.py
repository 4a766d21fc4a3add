"""``python -m pytest_kvquality sweep ...``: see sweep.py."""

import sys

from .sweep import main

sys.exit(main())
