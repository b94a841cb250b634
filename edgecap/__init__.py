"""edgecap: fast image captioning (Show, Attend and Tell) for Jetsons, GPUs and plain CPUs.

    from edgecap import Captioner
    print(Captioner().caption("photo.jpg").text)

Importing edgecap loads its error classes only; the first use of ``Captioner`` loads numpy and
Pillow, and onnxruntime, torch or tensorrt are imported when a backend that needs them is
created.
"""

import os
from typing import TYPE_CHECKING

from edgecap.errors import BackendError, DataError, EdgecapError, InputError, ModelError

if TYPE_CHECKING:  # for type checkers (py.typed): at run time ``__getattr__`` imports them on first use
    from edgecap.api import Caption, Captioner
    from edgecap.decoding import CaptionOptions

# onnxruntime (1.32 checked) writes a telemetry device id under ~/.cache/Microsoft when it is
# imported. Every part of edgecap that imports it (the backends, the caption language models'
# fusion step, convert, export, eval) comes after this package, so the default is set here,
# once, unless the variable is already set (ORT_DISABLE_TELEMETRY=0 allows it).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
_API = ("Caption", "CaptionOptions", "Captioner")


if not TYPE_CHECKING:  # hidden from type checkers, which take a module's ``__getattr__`` to
    # make every name: ``from edgecap import Captionr`` (a typo) had passed mypy and pyright as
    # ``Any``; they see the lazy names in the ``TYPE_CHECKING`` import above

    def __getattr__(name: str) -> object:
        # ``edgecap.api`` (numpy, Pillow) is imported on first use, not with the package: the
        # command line's ``python -m edgecap`` then imports nothing heavy before its Ctrl-C
        # handler is in place.
        if name in _API:
            from edgecap import api

            return getattr(api, name)
        raise AttributeError(f"module 'edgecap' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too: ``dir(edgecap)`` (an editor's or IPython's completion) listed no
    # ``Captioner`` until it had been used once
    return sorted({*globals(), *_API})


__all__ = [
    "Caption",
    "CaptionOptions",
    "Captioner",
    "EdgecapError",
    "InputError",
    "ModelError",
    "BackendError",
    "DataError",
    "__version__",
]
