import sys

try:
    from edgecap.cli import run_command
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: no traceback
    sys.exit(130)
run_command()
