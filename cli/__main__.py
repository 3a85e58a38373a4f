"""`python -m cli ...` = the `compaction` command."""

import sys

from cli.main import main

sys.exit(main())
