"""Options shared by the commands that caption (caption, eval). The defaults are
``CaptionOptions``' and the backend names the registry's: neither is written again here."""

from __future__ import annotations

import argparse
from dataclasses import fields

from edgecap.backends import NAMES
from edgecap.decoding import CaptionOptions

DEFAULTS = {f.name: f.default for f in fields(CaptionOptions)}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --backend, --device, --beam-size, --max-length, --no-repeat-ngram, --batch-size,
    --guidance-bonus / --no-objects-guidance."""
    p.add_argument("--model", help="model directory (default: the model shipped with edgecap)")
    p.add_argument("--backend", choices=sorted(NAMES, key=lambda name: name != "auto"),
                   default="auto", help="auto: onnxruntime if installed, else tensorrt, else torch")
    p.add_argument("--device", choices=("cpu", "cuda"), help="where the backend runs")
    p.add_argument("--beam-size", type=int, default=DEFAULTS["beam_size"])
    p.add_argument("--max-length", type=int, default=DEFAULTS["max_length"],
                   help="most words per caption")
    p.add_argument("--no-repeat-ngram", type=int, default=DEFAULTS["no_repeat_ngram"], metavar="N",
                   help="never repeat a phrase of N words within a caption "
                        f"(default {DEFAULTS['no_repeat_ngram']}; 0: off)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="images per encoder run")
    p.add_argument("--guidance-bonus", type=float, default=DEFAULTS["guidance_bonus"],
                   metavar="X", help="steer the caption toward naming the photo's object tags: "
                   "X is added to the log-probability of their words until a beam says one "
                   f"(default {DEFAULTS['guidance_bonus']})")
    p.add_argument("--no-objects-guidance", dest="guidance_bonus", action="store_const",
                   const=0.0, help="no steering: the caption model alone (--guidance-bonus 0)")
    p.add_argument("--fusion-weight", type=float, default=DEFAULTS["fusion_weight"], metavar="X",
                   help="weight of the everyday caption language model fused into the search "
                        "(X * (log p_everyday - log p_in-domain) on each word; default: the "
                        "model's own, from its fusion.json; a model without one has none)")
    p.add_argument("--no-fusion", dest="fusion_weight", action="store_const", const=0.0,
                   help="no language-model fusion (--fusion-weight 0)")
    p.add_argument("--no-blank-check", dest="blank_check", action="store_false",
                   help="caption every frame, even one with nothing to recognise (uniform or "
                        "blurred past any detail), instead of saying 'nothing recognisable'")
    p.add_argument("--constrained", action="store_true",
                   help="constrained beam search instead: the caption must say a word of one of "
                        f"the photo's top {DEFAULTS['guidance_tags']} object tags of probability "
                        f"{DEFAULTS['constraint_min_prob']} or more (2 x beam-size rows per "
                        "photo; see the README)")


def caption_options(args: argparse.Namespace) -> CaptionOptions:
    """The command line's caption options; a field the command has no flag for keeps its
    default."""
    return CaptionOptions(**{name: getattr(args, name) for name in DEFAULTS if hasattr(args, name)})


def load_captioner(args: argparse.Namespace):
    """The ``Captioner`` the arguments ask for. Raises ``ValueError`` for a bad option value."""
    from edgecap.api import Captioner

    return Captioner(model=args.model, backend=args.backend, device=args.device,
                     options=caption_options(args))
