"""``python -m fedseg`` is the ``fedseg`` command."""
from fedseg.cli import main

main()
