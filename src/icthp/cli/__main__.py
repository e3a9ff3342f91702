"""``python -m icthp.cli ...`` (and ``accelerate launch -m icthp.cli ...``, ``torchrun -m icthp.cli ...``)."""

import sys

from icthp.cli import main

sys.exit(main())
