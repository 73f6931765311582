"""``python -m imgembed.cli``."""
from imgembed.cli import main

main()
