"""``python -m geosurge`` (and ``torchrun -m geosurge train ...``)."""
import sys

from .cli import main

sys.exit(main())
