"""``python -m blasst_ref.calibrate``: calibrate the threshold law on LLM-like workloads."""

import sys

from . import main

sys.exit(main())
