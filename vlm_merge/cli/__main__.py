"""`python -m vlm_merge.cli ...`: the `vlm-merge` command."""

import sys

from vlm_merge.cli import main

sys.exit(main())
