"""Caption dataset readers: Flickr8k text files, COCO caption JSON, Karpathy ``dataset_*.json``;
``edgecap.data.folder``: a folder of your own photos with ``captions.csv`` / ``captions.jsonl``."""

from edgecap.data.readers import (
    CaptionedImage,
    read_coco,
    read_dataset,
    read_flickr8k,
    read_karpathy,
)

__all__ = ["CaptionedImage", "read_coco", "read_dataset", "read_flickr8k", "read_karpathy"]
