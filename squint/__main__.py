import sys

from squint.cli import main

sys.exit(main())
