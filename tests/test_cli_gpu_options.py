"""``--precision``, ``--cuda-graphs``, ``--gpu-preprocess`` and ``--search`` (caption, eval,
serve): the backends' GPU options from the command line. On this CPU-only machine the end-to-end test
stands the GPU in with the CPU (the backend's device check answering "cpu" and the CUDA graph
factory replaced by the eager stand-in), so what is checked is that each flag reaches the
backend the command builds and that a caption still comes out; the refusals are checked as a
user meets them (exit 2, one line naming the flag and what to add)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import edgecap  # noqa: E402
from edgecap.backends import _check_options  # noqa: E402
from edgecap.backends import torch as torch_backend  # noqa: E402
from edgecap.backends.torch_graphs import EagerGraph  # noqa: E402
from edgecap.cli import build_parser, main  # noqa: E402
from edgecap.commands._options import gpu_options  # noqa: E402

CHELSEA = str(Path(edgecap.__file__).parent / "assets" / "examples" / "chelsea.png")


class StandInCudaGraphs:
    """``CudaGraphs(device)``'s interface over the eager stand-in, recording its device."""

    made: list = []

    def __init__(self, device):
        self.device = device
        StandInCudaGraphs.made.append(self)

    def __call__(self, fn):
        return EagerGraph(fn)


def _args(*argv: str):
    return build_parser().parse_args(["caption", CHELSEA, *argv])


def test_every_flag_reaches_the_torch_backend(built, monkeypatch, capsys):
    """fp16 = the FP16 decoder behind the FP32 encoder (the captions-keeping FP16 of
    docs/gpu-search.md), graphs through the CUDA graph factory, frames prepared by the backend."""
    monkeypatch.setattr(torch_backend, "_checked_device", lambda *args, **kwargs: "cpu")
    monkeypatch.setattr(torch_backend, "CudaGraphs", StandInCudaGraphs)
    StandInCudaGraphs.made.clear()
    argv = ["caption", CHELSEA, "--backend", "torch", "--device", "cuda", "--max-length", "4"]
    gpu = ["--precision", "fp16", "--cuda-graphs", "--gpu-preprocess"]
    assert main([*argv, *gpu, "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(CHELSEA + "\t") and len(line) > len(CHELSEA) + 1  # a caption came out
    backend = built[-1].backend
    assert backend.dtype == torch.float16 and backend.fp32_encoder
    assert isinstance(backend.graph_factory, StandInCudaGraphs) and len(StandInCudaGraphs.made) == 1
    assert backend.prepares_frames and backend.frame_preprocess is not None
    assert "fp16 decoder, fp32 encoder, CUDA graphs" in backend.describe()
    assert "preprocessing on the device" in backend.describe()

    assert main([*argv, "--no-progress"]) == 0  # without the flags: none of it
    capsys.readouterr()
    plain = built[-1].backend
    assert plain.dtype == torch.float32 and plain.graph_factory is None and not plain.prepares_frames


@pytest.mark.parametrize(
    "argv, keywords",
    [
        ([], {}),
        (["--backend", "torch", "--precision", "fp32"], {}),  # torch's own: nothing to change
        (
            ["--backend", "torch", "--device", "cuda", "--precision", "fp16"],
            {"fp16": True, "fp32_encoder": True},
        ),
        (["--backend", "torch", "--device", "cuda", "--cuda-graphs"], {"cuda_graphs": True}),
        (["--backend", "torch", "--device", "cuda", "--gpu-preprocess"], {"preprocess": "device"}),
        (["--backend", "onnxruntime", "--precision", "fp32"], {}),  # the shipped model's own
        (["--backend", "tensorrt", "--precision", "fp32"], {"precision": "fp32"}),
        (["--backend", "tensorrt", "--precision", "fp16"], {"precision": "fp16"}),
        (["--backend", "onnxruntime", "--search", "graph"], {"search": "graph"}),
        (["--backend", "onnxruntime", "--search", "host"], {"search": "host"}),
        (["--backend", "tensorrt", "--search", "graph"], {"search": "graph"}),
        (["--backend", "torch", "--search", "device"], {"search": "device"}),
        (
            ["--backend", "torch", "--device", "cuda", "--cuda-graphs", "--search", "host"],
            {"cuda_graphs": True, "search": "host"},
        ),
    ],
)
def test_the_keywords_each_backend_gets(argv, keywords):
    assert gpu_options(_args(*argv)) == keywords


def test_the_keywords_are_the_backends_own():
    """Each keyword is a parameter of the backend's class (a misspelt one would be refused by
    ``load_backend`` only on a GPU, where the flags are used)."""
    everything = gpu_options(
        _args(
            "--backend",
            "torch",
            "--device",
            "cuda",
            "--precision",
            "fp16",
            "--cuda-graphs",
            "--gpu-preprocess",
            "--search",
            "device",
        )
    )
    assert set(everything) == {"fp16", "fp32_encoder", "cuda_graphs", "preprocess", "search"}
    _check_options(torch_backend.TorchBackend, "torch", everything)
    from edgecap.backends.onnxruntime import OnnxRuntimeBackend
    from edgecap.backends.tensorrt import TensorRTBackend

    trt = gpu_options(_args("--backend", "tensorrt", "--precision", "fp16", "--search", "graph"))
    assert set(trt) == {"precision", "search"}
    _check_options(TensorRTBackend, "tensorrt", trt)
    _check_options(
        OnnxRuntimeBackend, "onnxruntime", gpu_options(_args("--backend", "onnxruntime", "--search", "graph"))
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--backend", "torch", "--cuda-graphs"],
            "--cuda-graphs runs on a GPU: add --device cuda",
        ),
        (
            ["--backend", "torch", "--device", "cpu", "--gpu-preprocess"],
            "--gpu-preprocess runs on a GPU: add --device cuda",
        ),
        (
            ["--backend", "torch", "--precision", "fp16"],
            "--precision fp16 runs on a GPU: add --device cuda",
        ),
        (
            ["--backend", "onnxruntime", "--cuda-graphs"],
            "--cuda-graphs is the torch backend's: add --backend torch --device cuda",
        ),
        (
            ["--backend", "tensorrt", "--gpu-preprocess"],
            "--gpu-preprocess is the torch backend's: add --backend torch --device cuda",
        ),
        (
            ["--backend", "torch", "--search", "graph"],
            "--search graph is not the torch backend's: add --backend onnxruntime or --backend tensorrt",
        ),
        (
            ["--backend", "onnxruntime", "--search", "device"],
            "--search device is not the onnxruntime backend's: add --backend torch",
        ),
        (
            ["--backend", "tensorrt", "--search", "device"],
            "--search device is not the tensorrt backend's: add --backend torch",
        ),
        (  # --backend auto: onnxruntime, here
            ["--search", "device"],
            "--search device is not the onnxruntime backend's (what --backend auto chose): add "
            "--backend torch",
        ),
        (  # the shipped model is FP32 (its manifest): onnxruntime cannot run it in FP16
            ["--backend", "onnxruntime", "--precision", "fp16"],
            "--precision fp16: onnxruntime runs the model's own precision, and the shipped model is "
            "fp32: make an FP16 copy with `edgecap convert ",
        ),
    ],
)
@pytest.mark.parametrize("command", ["caption", "eval"])
def test_a_flag_the_backend_cannot_take_is_refused_before_loading(
    command, argv, message, built, capsys, tmp_path
):
    """Exit 2 with one line naming the flag, and no model loaded (no Captioner made)."""
    where = [CHELSEA]
    if command == "eval":  # a one-photo split in COCO's caption JSON
        shutil.copy(CHELSEA, tmp_path / "a.png")
        references = {
            "images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}],
        }
        (tmp_path / "r.json").write_text(json.dumps(references))
        where = ["--images", str(tmp_path), "--references", str(tmp_path / "r.json")]
    assert main([command, *where, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert built == []


def test_the_help_says_what_each_flag_does(capsys):
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--precision {fp32,fp16}" in text
    assert "98.6-99.4% of FP32's captions" in text  # the % of the figure survives argparse's formatting
    assert "--cuda-graphs" in text and "--gpu-preprocess" in text
    assert "--search {host,device,graph}" in text and "not yet run on TensorRT or onnxruntime-gpu" in text


@pytest.mark.parametrize(
    "backend, search",
    [("onnxruntime", "graph"), ("onnxruntime", "host"), ("torch", "device"), ("torch", "host")],
)
def test_search_reaches_the_backend_and_keeps_the_captions(backend, search, built, capsys):
    """``--search`` runs the search where it says, on this CPU (onnxruntime's step graph with
    the bookkeeping in it; torch's device search on CPU tensors), and the captions are those
    of the backend's default."""
    argv = [
        "caption",
        CHELSEA,
        str(Path(CHELSEA).with_name("coffee.png")),
        "--backend",
        backend,
        "--no-progress",
    ]
    assert main(argv) == 0
    want = capsys.readouterr().out
    assert main([*argv, "--search", search]) == 0
    assert capsys.readouterr().out == want
    made = built[-1].backend
    if backend == "onnxruntime":
        assert (made._graph_search is not None) == (search == "graph")
        assert ("beam bookkeeping in the step graph" in made.describe()) == (search == "graph")
    else:
        assert made.on_device == (search == "device") and made.search_mode == search


def _fp16_model(tmp_path) -> Path:
    """The shipped model's files under a manifest that says FP16 (what `edgecap convert` writes
    there): only the manifest is read before the model loads."""
    shipped = Path(edgecap.__file__).parent / "assets" / "default"
    model = tmp_path / "fp16-model"
    model.mkdir()
    for path in shipped.iterdir():
        if path.name != "manifest.json":
            (model / path.name).symlink_to(path)
    manifest = json.loads((shipped / "manifest.json").read_text())
    manifest["precision"] = "fp16"
    (model / "manifest.json").write_text(json.dumps(manifest))
    return model


def test_onnxruntime_takes_the_precision_its_model_has(tmp_path, built, capsys):
    """An FP16 model with --precision fp16 runs as it is; --precision fp32 asks for what
    onnxruntime cannot give it: refused, naming the model and what to pass instead (not run
    silently in FP16)."""
    model = str(_fp16_model(tmp_path))
    assert gpu_options(_args("--backend", "onnxruntime", "--model", model, "--precision", "fp16")) == {}
    argv = ["caption", CHELSEA, "--backend", "onnxruntime", "--model", model, "--precision", "fp32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        f"--precision fp32: onnxruntime runs the model's own precision, and the model {model} is "
        "fp16: pass an FP32 model with --model DIR"
    ) in err
    assert err.count("\n") == 1 and built == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_no_cuda_is_said_in_the_flags_words(capsys):
    """The backend's message names the API's device='cuda'; the command line says its flag."""
    assert main(["caption", CHELSEA, "--backend", "torch", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda but this torch has no usable CUDA GPU; use --device cpu or install" in err
    assert "device='" not in err


def test_fp16_asked_of_an_int8_model_says_to_convert_its_fp32_source(tiny_model_dir, tmp_path):
    """``--precision fp16`` with an int8 model on onnxruntime: the hint is to convert the FP32
    model the int8 one came from, as ``edgecap convert`` takes FP32 models only; it had named the
    int8 folder itself, which convert refuses ("precision is 'int8'; convert from the FP32 model
    directory")."""
    from edgecap.commands._options import _check_model_precision
    from helpers import copy_model, edit_manifest, set_field

    model = copy_model(tiny_model_dir, tmp_path / "int8")
    edit_manifest(model, set_field(["precision"], "int8"))
    with pytest.raises(ValueError) as info:
        _check_model_precision(str(model), "fp16")
    said = str(info.value)
    assert (
        "make an FP16 copy with `edgecap convert FP32_DIR --precision fp16 --out DIR` (FP32_DIR: the FP32"
        in said
    )
    assert f"convert {model}" not in said
    with pytest.raises(
        ValueError, match=rf"make an FP16 copy with `edgecap convert {tiny_model_dir} --precision"
    ):
        _check_model_precision(str(tiny_model_dir), "fp16")


def test_search_graph_without_onnx_is_said_in_the_flags_words(monkeypatch, capsys):
    """The step graph is derived with the onnx package; without it ``--search graph`` is one
    line naming the flag and the install, exit 2 (the backend's message names the API's
    ``search='graph'``)."""
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx: ImportError
    assert main(["caption", CHELSEA, "--backend", "onnxruntime", "--search", "graph"]) == 2
    err = capsys.readouterr().err
    assert "--search graph derives its step graph with the onnx package: pip install onnx" in err
    assert "search='graph'" not in err and err.count("\n") == 1
