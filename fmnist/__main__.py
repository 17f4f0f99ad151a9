"""`python -m fmnist ...` is the same as the `fmnist` console script."""
import sys

from fmnist.cli import main

sys.exit(main())
