"""`python -m trl_appo.cli` = `trl-appo`."""

import sys

from trl_appo.cli import main

sys.exit(main())
