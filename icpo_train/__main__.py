"""`python -m icpo_train ...`, which is what `accelerate launch -m icpo_train ...` runs."""

import sys

from icpo_train.cli import main

sys.exit(main())
