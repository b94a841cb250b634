"""End-to-end captioning latency per variant, each variant in its own process (the isolated harness).

    python benchmarks/e2e.py                                  # ort-fp32, torch-eager, ort-fp32-noguide
    python benchmarks/e2e.py --model-b runs/models/other      # adds ort-fp32-b: the other model
    python benchmarks/e2e.py --variants ort-fp32/spin-on,ort-fp32/spin-off --name spinning
    python benchmarks/e2e.py --rounds 2 --per-round 4 --warmup 1   # a quick try, not a figure

``Captioner.caption_batch`` at beam 3 / batch 1 (``--beam``, ``--batch``) on in-memory frames of
the package's example photos (decoded RGB arrays, like camera frames; every call takes the next
photo, so each variant captions the same photos in the same order), and the encoder alone
(``captioner.backend.encode`` of one preprocessed frame). Each variant is a worker process
started once (``benchmarks/_isolated.py``); rounds are interleaved across the variants with only
one worker running at a time, then every variant is timed once more alone (``--alone-passes N``:
N times, the variants in turn, pooled); a variant whose interleaved median is more than 15% off
its alone median is flagged.

Variants:

    ort-fp32          Captioner(): onnxruntime on the CPU, the library's defaults
    torch-eager       Captioner(backend="torch")
    ort-fp32-noguide  Captioner(guidance_bonus=0): object-guided decoding off
    ort-fp32-constrained  Captioner(constrained=True): constrained beam search on the tags
    ort-fp32-noconsensus  Captioner(consensus=False): the search's own best caption, no consensus choice
    ort-fp32-nofusion     Captioner(fusion_weight=0): the model's everyday language models off
    ort-fp32-numpy-lm     Captioner() with the language models stepped in numpy, as where onnxruntime
                          is not installed (the default steps them in one onnxruntime run)
    ort-fp32-b        Captioner(MODEL_B): the model directory given with --model-b
    NAME/spin-on, NAME/spin-off   an onnxruntime variant with session.intra_op.allow_spinning
                                  set to 1 / 0 (without a suffix: the library's setting, off)

Writes NAME.json and NAME.md (NAME: ``--name``, default e2e) into ``--out DIR``, by default a
new folder under benchmarks/runs/ (git ignores it): ``--out benchmarks/results`` replaces the
committed figures.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import _common as C
import _isolated as I

BASE_VARIANTS = (
    "ort-fp32",
    "torch-eager",
    "ort-fp32-noguide",
    "ort-fp32-constrained",
    "ort-fp32-noconsensus",
    "ort-fp32-nofusion",
    "ort-fp32-numpy-lm",
    "ort-fp32-b",
)
DEFAULT_VARIANTS = ("ort-fp32", "torch-eager", "ort-fp32-noguide")
SPINNING = {"on": "1", "off": "0"}


# -- in the worker ---------------------------------------------------------------------------------


class CaptionTask:
    """A Captioner and the calls timed on it: ``e2e`` (caption_batch of the next ``batch``
    frames) and ``encoder`` (backend.encode of one preprocessed frame)."""

    def __init__(
        self,
        model: str | None,
        backend: str,
        beam: int,
        batch: int,
        max_length: int,
        caption_options: dict,
        backend_options: dict,
        session_config: dict,
        numpy_lm: bool = False,
    ):
        import numpy as np

        from edgecap.images import load_rgb, preprocess

        variant = C.Variant(
            "worker", backend, Path(model) if model else C.DEFAULT_MODEL, backend_options, session_config
        )
        self.captioner = variant.captioner(
            beam_size=beam, batch_size=batch, max_length=max_length, **caption_options
        )
        if numpy_lm:  # the fallback step, set where Fusion.step would have made the onnxruntime one
            from edgecap.decoding.fusion import NumpyPairStep

            fusion = self.captioner.fusion
            fusion.__dict__["step"] = NumpyPairStep(fusion.everyday, fusion.in_domain)
        self.frames = C.example_frames()
        self.batch = batch
        self._next = itertools.cycle(range(len(self.frames)))
        one = preprocess([load_rgb(self.frames[0], "rgb")], self.captioner.manifest.preprocessing)[0]
        self.encoder_input = np.ascontiguousarray(one[None])
        first = self.captioner.caption_batch([self.frames[0]])[0]
        self.info = {
            "describe": self.captioner.backend.describe(),
            "model": str(self.captioner.manifest.directory),
            "options": repr(self.captioner.options),
            "session_config": session_config,
            "first_caption": first.text,
            "allow_spinning": self._spinning(),
            "language_models": self._language_models(),
        }
        self.measures = {"e2e": self.e2e, "encoder": self.encoder}

    def _spinning(self) -> str | None:
        """session.intra_op.allow_spinning as the encoder session has it ("default" where it
        was not set: onnxruntime's default, spinning on); None for other backends."""
        session = getattr(self.captioner.backend, "encoder", None)
        if not hasattr(session, "get_session_options"):
            return None
        try:
            return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except Exception:  # not set
            return "default"

    def _language_models(self) -> str:
        """How the fused language models step: "onnxruntime" (one run for both), "numpy",
        or "off" (a model without them, or fusion_weight 0)."""
        fusion = self.captioner.fusion
        if fusion is None or self.captioner.options.fusion_weight == 0:
            return "off"
        return "numpy" if type(fusion.step).__name__ == "NumpyPairStep" else "onnxruntime"

    def e2e(self):
        return self.captioner.caption_batch([self.frames[next(self._next)] for _ in range(self.batch)])

    def encoder(self):
        return self.captioner.backend.encode(self.encoder_input)


def make_task(**kwargs) -> CaptionTask:
    return CaptionTask(**kwargs)


# -- in the parent ---------------------------------------------------------------------------------


def variant_spec(label: str, args) -> I.Spec:
    name, _, spin = label.partition("/")
    if name not in BASE_VARIANTS:
        sys.exit(
            f"unknown variant {label!r}; choose from {', '.join(BASE_VARIANTS)} "
            "(optionally with /spin-on or /spin-off)"
        )
    model = str(C.model_dir(args.model))
    backend, caption_options, backend_options = "onnxruntime", {}, {"device": "cpu"}
    if name == "torch-eager":
        backend = "torch"
    elif name == "ort-fp32-noguide":
        caption_options = {"guidance_bonus": 0.0}
    elif name == "ort-fp32-constrained":
        caption_options = {"constrained": True}
    elif name == "ort-fp32-noconsensus":
        caption_options = {"consensus": False}
    elif name == "ort-fp32-nofusion":
        caption_options = {"fusion_weight": 0.0}
    elif name == "ort-fp32-b":
        if args.model_b is None:
            sys.exit("ort-fp32-b needs --model-b DIR")
        model = str(C.model_dir(args.model_b))
    if name == "ort-fp32-numpy-lm" and not (Path(model) / "fusion.json").is_file():
        sys.exit(f"{label!r}: {model} has no language models (fusion.json) to step in numpy")
    if args.threads is not None and backend == "onnxruntime":
        backend_options["threads"] = args.threads
    session_config = {}
    if spin:
        if backend != "onnxruntime" or spin.removeprefix("spin-") not in SPINNING:
            sys.exit(f"{label!r}: /spin-on or /spin-off, on an onnxruntime variant")
        session_config = {"session.intra_op.allow_spinning": SPINNING[spin.removeprefix("spin-")]}
    elif args.spinning != "default" and backend == "onnxruntime":
        session_config = {"session.intra_op.allow_spinning": SPINNING[args.spinning]}
    kwargs = {
        "model": model,
        "backend": backend,
        "beam": args.beam,
        "batch": args.batch,
        "max_length": args.max_length,
        "caption_options": caption_options,
        "backend_options": backend_options,
        "session_config": session_config,
        "numpy_lm": name == "ort-fp32-numpy-lm",
    }
    return I.Spec(label, "e2e:make_task", kwargs)


def build_parser():
    p = C.argument_parser(__doc__)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped model)")
    p.add_argument(
        "--model-b", type=Path, default=None, help="a second model directory, run as variant ort-fp32-b"
    )
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, from {', '.join(BASE_VARIANTS)}, each optionally "
        f"with /spin-on or /spin-off (default: {','.join(DEFAULT_VARIANTS)}, "
        "plus ort-fp32-b with --model-b); the first is the ratios' baseline",
    )
    p.add_argument("--beam", type=C.positive_int, default=3, help="beam size")
    p.add_argument("--batch", type=C.batch_size, default=1, help="frames per caption_batch call")
    p.add_argument("--max-length", type=C.positive_int, default=20, help="most words per caption")
    p.add_argument(
        "--threads",
        type=C.positive_int,
        default=None,
        help="onnxruntime intra-op threads (default: the library's, physical cores)",
    )
    p.add_argument(
        "--spinning",
        choices=("default", "on", "off"),
        default="default",
        help="onnxruntime intra-op spinning in the onnxruntime variants without a /spin- suffix: "
        "on, off, or default: the library's own setting (off), what a user gets",
    )
    p.add_argument(
        "--rounds", type=C.positive_int, default=15, help="interleaved rounds (and as many in the alone pass)"
    )
    p.add_argument(
        "--per-round",
        type=C.positive_int,
        default=4,
        help="calls per variant, measure and round (4 = each example photo once)",
    )
    p.add_argument(
        "--warmup", type=C.non_negative_int, default=3, help="unmeasured calls per worker and measure"
    )
    p.add_argument("--no-alone", action="store_true", help="skip the alone pass (no flags)")
    p.add_argument(
        "--alone-passes",
        type=int,
        default=1,
        metavar="N",
        help="make the alone pass N times, the variants in turn (the first one rotating), and pool "
        "each variant's calls: "
        "a host whose speed drifts then drifts under every variant alike (default: %(default)s)",
    )
    p.add_argument("--no-encoder", action="store_true", help="time end to end only")
    p.add_argument(
        "--idle-windows",
        default="0.2,1.0",
        help="consecutive windows (s) of idleness after a call over which each worker's CPU time is read",
    )
    p.add_argument(
        "--settle",
        type=C.non_negative_float,
        default=0.25,
        help="untimed pause (s) before each turn, longer than onnxruntime's spinning",
    )
    p.add_argument("--name", default="e2e", help="results file names: NAME.json and NAME.md")
    C.add_out_argument(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.alone_passes < 1:
        p.error(f"--alone-passes must be at least 1, got {args.alone_passes}")
    if args.no_alone and args.alone_passes != 1:
        p.error("--alone-passes and --no-alone: choose one")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    labels = (
        [v.strip() for v in args.variants.split(",") if v.strip()]
        if args.variants
        else list(DEFAULT_VARIANTS) + (["ort-fp32-b"] if args.model_b else [])
    )
    specs = [variant_spec(label, args) for label in labels]
    measures = ["e2e"] if args.no_encoder else ["e2e", "encoder"]
    load_before = C.load_average()
    result = I.run_isolated(
        specs,
        measures,
        rounds=args.rounds,
        per_round=args.per_round,
        warmup=args.warmup,
        alone=not args.no_alone,
        alone_passes=args.alone_passes,
        idle_windows_s=[float(w) for w in args.idle_windows.split(",")],
        settle_s=args.settle,
    )
    settings = {
        "beam": args.beam,
        "batch": args.batch,
        "max_length": args.max_length,
        "input": "frames of the example photos, cycled",
        "load_average": [load_before, C.load_average()],
    }
    data = {"settings": {**settings, **result.pop("settings")}, **result}
    variants = "\n".join(
        f"- {n}: {v['info'].get('describe')}; "
        + "".join(f"{k}={val}; " for k, val in v["info"].get("session_config", {}).items())
        + f"model {v['info'].get('model')}; language models {v['info'].get('language_models')}; "
        + "first caption "
        f'"{v["info"].get("first_caption")}"'
        for n, v in data["variants"].items()
    )
    text = (
        f"Beam {args.beam}, batch {args.batch}, max {args.max_length} words; e2e = "
        "`Captioner.caption_batch` on in-memory frames of the example photos (each call the "
        "next photo), encoder = `backend.encode` of one preprocessed frame. Load average "
        f"before/after: {settings['load_average'][0]} / {settings['load_average'][1]} (a "
        "busy machine inflates and scatters every figure).\n\n" + variants + "\n\n" + I.report_markdown(data)
    )
    C.write_results(args.name, data, text, argv, script="e2e", out=args.out)
    if data["flags"]:
        print("FLAGGED: " + "; ".join(data["flags"]), file=sys.stderr)


if __name__ == "__main__":
    main()
