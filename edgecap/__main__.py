import sys

try:
    from edgecap.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: no traceback
    code = 130
sys.exit(code)
