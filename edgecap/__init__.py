"""edgecap: fast image captioning (Show, Attend and Tell) for Jetsons, GPUs and plain CPUs.

    from edgecap import Captioner
    print(Captioner().caption("photo.jpg").text)

Importing edgecap loads numpy and Pillow only; onnxruntime, torch and tensorrt are imported when
a backend that needs them is created.
"""

from edgecap.api import Caption, CaptionOptions, Captioner
from edgecap.errors import BackendError, EdgecapError, InputError, ModelError

__version__ = "0.1.0"

__all__ = ["Caption", "CaptionOptions", "Captioner", "EdgecapError", "InputError", "ModelError",
           "BackendError", "__version__"]
