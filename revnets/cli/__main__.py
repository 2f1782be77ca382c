"""`python -m revnets.cli ...` (as torchrun starts it): the `revnets` command."""
import sys

from . import main

sys.exit(main())
