"""`python -m vlm.demo`: see `vlm.demo.driver`."""

import sys

from vlm.demo.driver import main

if __name__ == "__main__":
    sys.exit(main())
