"""`python -m trl_treepo.benchmark`: see the package docstring, or `--help`."""

from .cli import main

main()
