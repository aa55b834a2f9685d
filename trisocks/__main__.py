import sys

from trisocks.cli import main

sys.exit(main())
