"""Re-export an ``edgecap-model/1`` directory in the current format, weights unchanged.

Format 2 adds the encoder's ImageNet class probabilities (``class_probs``: object tags) and the
decoder step's ``word_bias`` input (steering the search toward the tags' words). A format-1
directory holds every weight the new graphs need except the encoder's classifier, which comes
from the same pretrained EfficientNet-Lite0 package; the encoder of a format-1 model trained
with a frozen encoder is that package's, checked here weight by weight.

    python export/upgrade_model.py OLD_MODEL_DIR --out NEW_MODEL_DIR

Needs ``edgecap[export]`` (torch, onnx). The upgraded model gives the same captions as the old
one when nothing steers the search (checked by ``edgecap export``'s PyTorch-vs-onnxruntime
check and, for the shipped model, by the pinned captions in the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from edgecap.backends.torch import read_initializers
from edgecap.contract import ModelDimensions
from edgecap.build.export import export_modules
from edgecap.manifest import Manifest
from edgecap.models.decoder import CaptionDecoder, DecoderConfig
from edgecap.models.efficientnet_lite import load_pretrained
from edgecap.preprocess import Preprocessing
from edgecap.vocab import Vocabulary

# what ``export_modules`` writes itself; everything else in the old manifest is carried over
REGENERATED = {
    "format",
    "files",
    "dims",
    "tokens",
    "preprocessing",
    "precision",
    "sha256",
    "attention",
    "decoder_config",
    "encoder",
    "exported",
    "export_check",
}


def upgrade(old_dir: Path, out_dir: Path) -> Manifest:
    data = json.loads((old_dir / "manifest.json").read_text())
    if data.get("format") != "edgecap-model/1":
        raise SystemExit(f"{old_dir}: format {data.get('format')!r}, expected edgecap-model/1")
    encoder = load_pretrained()
    old = Manifest(
        directory=old_dir,
        files=data["files"],
        dims=ModelDimensions.from_dict({**data["dims"], "n_classes": 1000}),
        tokens=data["tokens"],
        preprocessing=Preprocessing.from_dict(data["preprocessing"]),
    )
    weights = read_initializers(old)
    own = encoder.state_dict()
    changed = [
        k
        for k, v in weights.items()
        if k.startswith("encoder.") and not np.array_equal(v, own[k[len("encoder.") :]].numpy())
    ]
    if changed:
        # a fine-tuned encoder: its classifier no longer matches its features
        raise SystemExit(
            f"{old_dir}: the encoder differs from the pretrained one "
            f"({changed[:3]} ...); re-export it from its training checkpoint"
        )
    decoder = CaptionDecoder(DecoderConfig(**data["decoder_config"]))
    decoder.load_state_dict(
        {
            k[len("decoder.") :]: torch.from_numpy(np.array(v))
            for k, v in weights.items()
            if k.startswith("decoder.")
        },
        strict=True,
    )
    vocab = Vocabulary.load(old_dir / data["files"]["vocab"])
    info = {k: v for k, v in data.items() if k not in REGENERATED}
    info["upgraded_from"] = {
        "format": data["format"],
        "exported": data.get("exported"),
        "sha256": data.get("sha256"),
    }
    return export_modules(encoder, decoder.eval(), vocab, old.preprocessing, out_dir, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="an edgecap-model/1 directory")
    parser.add_argument("--out", type=Path, required=True, help="where to write the new one")
    args = parser.parse_args(argv)
    manifest = upgrade(args.model_dir, args.out)
    print(f"wrote {manifest.directory} ({json.dumps(manifest.info['export_check']['max_abs_diff'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
