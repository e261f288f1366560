"""`python -m fastcount`: the same as the `fastcount` command."""

import sys

from fastcount.cli import main

sys.exit(main())
