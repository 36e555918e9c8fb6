"""``python -m groupvit_core`` runs the ``groupvit`` command."""

import sys

from .cli import main

sys.exit(main())
