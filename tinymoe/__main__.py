"""`python -m tinymoe TOOL [flags]`: the `tinymoe` command without installing it (launch.py)."""

import sys

from tinymoe.launch import main

if __name__ == "__main__":
    sys.exit(main())
