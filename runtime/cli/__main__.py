"""`python -m runtime.cli`: the `pathways` command."""

import sys

from runtime.cli import main

sys.exit(main())
