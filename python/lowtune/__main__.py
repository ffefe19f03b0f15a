"""`python -m lowtune ...` runs the command line (see lowtune.cli)."""
import sys

from .cli import main

sys.exit(main())
