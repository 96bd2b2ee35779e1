"""``python -m hfp8.cli`` (torchrun launches it this way): the ``hfp8-ptq`` command."""

import sys

from hfp8.cli import main

sys.exit(main())
