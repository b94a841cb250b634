"""Peak resident memory (RSS) of `import edgecap` alone and of processes that caption, each in a
fresh Python subprocess.

    python benchmarks/memory.py                       # shipped model, every available variant
    python benchmarks/memory.py --model runs/m --variants ort-fp32,ort-int8

Each case runs in its own interpreter and reports its own peak: the kernel's high-water mark
(``VmHWM`` in /proc/self/status, the same figure as ``resource.getrusage().ru_maxrss``). Cases:
an empty interpreter, `import edgecap`, then per variant: the model loaded (``Captioner(...)``),
one caption (beam 3), and a batch of 8 (beam 3).
"""

from __future__ import annotations

import json
import subprocess
import sys

import _common as C

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})

def peak_mib():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

marks = {{}}
t0 = time.perf_counter()
stage = {stage!r}
if stage != "python":
    import edgecap
    marks["import"] = peak_mib()
if stage in ("load", "caption", "batch"):
    import numpy as np
    from PIL import Image
    from edgecap import Captioner
    captioner = Captioner({model!r}, backend={backend!r}, beam_size=3, batch_size=8,
                          **{options!r})
    marks["load"] = peak_mib()
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in {images!r}]
    if stage == "caption":
        captioner.caption(frames[0])
    if stage == "batch":
        captioner.caption_batch([frames[i % len(frames)] for i in range(8)])
print(json.dumps({{"peak_mib": peak_mib(), "marks": marks, "s": time.perf_counter() - t0}}))
"""


def run_case(stage: str, variant: C.Variant | None, images: list[str]) -> dict:
    code = CHILD.format(
        repo=str(C.REPO),
        stage=stage,
        model=str(variant.model) if variant else "",
        backend=variant.backend if variant else "",
        options=variant.options if variant else {},
        images=images,
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_parser():
    p = C.argument_parser(__doc__)
    C.add_model_arguments(p)
    C.add_out_argument(p)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    variants, notes = C.resolve_variants(args)
    images = [str(path) for path in sorted(C.EXAMPLES.iterdir()) if path.suffix.lower() in {".png", ".jpg"}]
    cases = [("python", None, "empty interpreter"), ("import", None, "import edgecap")]
    for v in variants:
        cases += [
            ("load", v, f"{v.name}: model loaded"),
            ("caption", v, f"{v.name}: one caption, beam 3"),
            ("batch", v, f"{v.name}: 8 captions, beam 3, batch 8"),
        ]
    results = []
    for stage, variant, label in cases:
        result = run_case(stage, variant, images)
        results.append(
            {"case": label, "stage": stage, "variant": variant.name if variant else None, **result}
        )
        print(f"[memory] {label}: {result.get('peak_mib', result.get('error'))}", file=sys.stderr)
    data = {"skipped": notes, "results": results}
    rows = [
        [
            r["case"],
            r.get("peak_mib", float("nan")),
            r.get("marks", {}).get("import", float("nan")),
            r.get("marks", {}).get("load", float("nan")),
            r.get("error", ""),
        ]
        for r in results
    ]
    table = C.markdown_table(["case", "peak RSS MiB", "after import MiB", "after load MiB", "error"], rows)
    text = (
        "Each case in a fresh interpreter; peak = VmHWM (high-water RSS) at the end.\n\n"
        + "".join(f"- {n}\n" for n in notes)
        + "\n"
        + table
    )
    C.write_results("memory", data, text, argv, out=args.out)


if __name__ == "__main__":
    main()
