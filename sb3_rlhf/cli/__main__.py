"""``python -m sb3_rlhf.cli``: the ``sb3-rlhf`` command (torchrun and ``accelerate launch`` start it this way)."""

import sys

from sb3_rlhf.cli import main

sys.exit(main())
