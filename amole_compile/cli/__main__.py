"""`python -m amole_compile.cli`: the same as the `amole-compile` command."""

import sys

from .commands import main

sys.exit(main())
