"""``python -m dist8.train --config ...`` (also under ``torchrun -m dist8.train``)."""
import sys

from dist8.train.cli import main

sys.exit(main())
