"""`python -m trl_treepo.learning`: see `cli.py`, or `--help`."""

from .cli import main

main()
