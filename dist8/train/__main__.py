"""``python -m dist8.train --config ...`` (also under ``torchrun -m dist8.train``)."""
import os
import sys

from dist8.train.cli import main

code = main()
if "LOCAL_RANK" in os.environ:
    # A rank under torchrun: everything is written and the process group destroyed, but gloo's
    # teardown at interpreter exit can still abort ("terminate called without an active
    # exception", seen in CI), turning a finished run into a failed one. Leave without it,
    # as the test workers do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
sys.exit(code)
