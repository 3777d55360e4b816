"""``python -m ctalign.bench``: the same as ``ctalign bench``."""
import sys

from ctalign.bench import main

sys.exit(main())
