"""`python -m compose.reference`: see `blocks.main`."""

import sys

from compose.reference.blocks import main

sys.exit(main())
