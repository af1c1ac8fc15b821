"""``python -m jobs``: the ``ebseg`` command, for environments where the console script is not installed
(a Ray job whose runtime environment carries the package as ``py_modules``)."""

import sys

from jobs.cli import main

sys.exit(main())
