"""`python -m qapframe` is the `qapframe` command (also what torchrun / accelerate launch run)."""

import sys

from qapframe.cli import main

sys.exit(main())
