"""`python -m prelora_ds.cli COMMAND ...`: the `prelora` command without its installed script."""

import sys

from prelora_ds.cli import main

sys.exit(main())
