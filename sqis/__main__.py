"""`python -m sqis`."""

from sqis.cli import main

main()
