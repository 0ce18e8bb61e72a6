"""``python -m landscape COMMAND ...`` (and ``torchrun ... -m landscape COMMAND ...``): the command line."""
from landscape.cli.main import entry

entry()
