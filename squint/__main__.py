import sys

from squint.app.cli import main

sys.exit(main())
