"""`python -m icpo_infer ...`."""

import sys

from icpo_infer.cli import main

sys.exit(main())
