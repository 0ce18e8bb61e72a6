"""``python -m landscape COMMAND ...`` (and ``torchrun ... -m landscape COMMAND ...``): the command line."""
import sys

from landscape.cli.main import main

sys.exit(main())
