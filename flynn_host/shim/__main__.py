"""`python -m flynn_host.shim JOBDIR`: run the shim."""

import sys

from flynn_host.shim import main

sys.exit(main())
