"""``python -m tokenprune.cli``: the ``tokenprune`` command (e.g. under ``torchrun``)."""

from tokenprune.cli import main

main()
