"""``python -m chaosfix``: the same CLI as the ``chaosfix`` script."""

from chaosfix.cli import main

raise SystemExit(main(prog_name="chaosfix"))
