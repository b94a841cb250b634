import sys

from edgecap.cli import main

sys.exit(main())
