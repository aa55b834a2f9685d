import sys

from trisocks.cli.main import main

sys.exit(main())
