"""``python -m saescope.cli`` runs the ``saescope`` command."""

import sys

from saescope.cli.main import main

sys.exit(main())
