"""``python -m sb3_rlhf.cli``: the ``sb3-rlhf`` command (torchrun and ``accelerate launch`` start it this way)."""

import sys

from sb3_rlhf.cli import main

if __name__ == "__main__":  # not on import (the API reference imports every module)
    sys.exit(main())
