"""`python -m gncodegen` runs the command line."""

from .cli import main

main()
