"""``python -m dist8 ...`` is the ``dist8`` command."""
import sys

from dist8.cli import main

sys.exit(main())
