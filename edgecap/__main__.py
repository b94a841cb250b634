import os
import sys

try:
    from edgecap.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: no traceback
    code = 130
distributed = sys.modules.get("torch.distributed")
if distributed is not None and distributed.is_available() and distributed.is_initialized():
    # A rank under torchrun (edgecap train): ended here, without the interpreter's teardown,
    # which PyTorch's gloo process group does not survive safely (edgecap.training.distributed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
