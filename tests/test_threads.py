"""``threads``: ``Captioner(threads=N)`` and ``edgecap caption / eval --threads N`` reach the
backend's real settings (onnxruntime's session options, torch's intra-op pool), and bad values
are refused in one line (exit 2) before any model is loaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import edgecap
from edgecap import Captioner, api
from edgecap.cli import main

CHELSEA = str(Path(edgecap.__file__).parent / "assets" / "examples" / "chelsea.png")


def _ort_threads(captioner) -> list[int]:
    """intra_op_num_threads as the live sessions have it (encoder, decoder step)."""
    return [
        s.get_session_options().intra_op_num_threads
        for s in (captioner.backend.encoder, captioner.backend.decoder)
    ]


@pytest.fixture
def torch_threads():
    """torch's process-wide intra-op threads, restored after the test."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, np.int64(2)])  # a number read from a config or array too
def test_onnxruntime_sessions_get_the_threads(threads):
    pytest.importorskip("onnxruntime")
    captioner = Captioner(backend="onnxruntime", device="cpu", threads=threads)
    assert _ort_threads(captioner) == [threads, threads]
    assert f"intra-op threads: {threads}" in captioner.backend.describe()


def test_the_graph_searchs_beam_step_session_gets_the_threads_too(monkeypatch):
    """search="graph" runs each word on a beam-step session of its own: threads=1 reaches it
    as it reaches the encoder and the decoder step. (The step graph stands in for the beam-step
    graph derived from it, which takes seconds to make.)"""
    pytest.importorskip("onnx")
    from edgecap.backends import ort_beam

    monkeypatch.setattr(ort_beam, "beam_step_model", lambda step, *args: step)
    captioner = Captioner(backend="onnxruntime", device="cpu", threads=1, search="graph")
    session = captioner.backend._graph_search.session(1, captioner.vocab.end)
    assert session.get_session_options().intra_op_num_threads == 1


def test_onnxruntime_default_is_the_librarys():
    pytest.importorskip("onnxruntime")
    captioner = Captioner(backend="onnxruntime", device="cpu")
    # onnxruntime reads 0 as "one per physical core"
    expected = api.DEFAULT_THREADS["onnxruntime"] or 0
    assert expected == 0  # the measured default (docs/performance-options.md)
    assert _ort_threads(captioner) == [expected, expected]
    # what describe() (eval results, the service's health) says of it: not "None"
    assert captioner.backend.describe().endswith("intra-op threads: physical cores)")


def test_torch_default_is_one_thread(torch_threads):
    """torch's default pool (one thread per core) collapses on a shared machine; the Captioner
    sets 1 unless told otherwise (measured: docs/performance-options.md)."""
    torch_threads.set_num_threads(2)
    Captioner(backend="torch")
    assert torch_threads.get_num_threads() == api.DEFAULT_THREADS["torch"] == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_pool_gets_the_threads(torch_threads, threads):
    torch_threads.set_num_threads(3)  # something else, so the backend must change it
    captioner = Captioner(backend="torch", threads=threads)
    assert torch_threads.get_num_threads() == threads
    assert f"intra-op threads: {threads}, process-wide" in captioner.backend.describe()


def test_caption_threads_option_reaches_the_sessions(built, capsys):
    pytest.importorskip("onnxruntime")
    assert (
        main(
            [
                "caption",
                CHELSEA,
                "--backend",
                "onnxruntime",
                "--threads",
                "1",
                "--max-length",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert _ort_threads(built[-1]) == [1, 1]
    assert capsys.readouterr().out.startswith(CHELSEA + "\t")


def test_caption_threads_option_reaches_torch(built, torch_threads, capsys):
    torch_threads.set_num_threads(3)
    assert main(["caption", CHELSEA, "--backend", "torch", "--threads", "1", "--max-length", "4"]) == 0
    assert torch_threads.get_num_threads() == 1
    assert built[-1].backend.name == "torch"


def test_eval_takes_threads_too():
    from edgecap.cli import build_parser

    args = build_parser().parse_args(["eval", "--images", "x", "--references", "r.json", "--threads", "2"])
    from edgecap.commands._options import threads_value

    assert threads_value(args.threads) == 2


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "", "10000"])
def test_bad_threads_are_one_line_exit_2(value, built, capsys):
    assert main(["caption", CHELSEA, "--threads", value]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("edgecap caption: error: --threads must be a positive integer")
    assert repr(value) in err
    assert built == []  # refused before any model was loaded


def test_threads_option_takes_1_to_the_limit_it_states():
    """--threads says "at most N" (64, or the cores where there are more): N itself is taken."""
    from edgecap.backends._checks import max_threads
    from edgecap.commands._options import threads_value

    limit = max_threads()
    assert limit == max(64, os.cpu_count() or 1)
    assert threads_value("1") == 1 and threads_value(str(limit)) == limit
    with pytest.raises(ValueError, match=rf"at most {limit}\), got '{limit + 1}'"):
        threads_value(str(limit + 1))


def test_a_numpy_integer_is_taken_as_the_int_it_is():
    from edgecap.backends._checks import check_threads

    assert type(check_threads(np.int64(2))) is int and check_threads(np.int64(2)) == 2


def test_more_threads_than_64_or_the_cores_are_refused(tmp_path):
    """10000 (a typo) took 11 s to build and 72 s for its first caption on 2 cores; 100000 had
    not started after 4 minutes and 9 GB. (No model folder here: a Captioner that took the
    value would fail on the folder, not hang building 10000 threads.)"""
    limit = max(64, os.cpu_count() or 1)
    with pytest.raises(ValueError, match=rf"threads must be a positive integer \(at most {limit}\)"):
        Captioner(tmp_path / "no-model-here", threads=limit + 1)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2", np.True_])
def test_api_refuses_bad_threads_before_loading(value, tmp_path):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        Captioner(threads=value)
    # before the model is even looked for
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        Captioner(tmp_path / "no-model-here", threads=value)


def test_the_stated_limit_itself_is_taken_by_the_api(monkeypatch):
    """``threads`` from 1 to "at most N" inclusive: N is taken, N + 1 is not; on a machine with
    128 cores N is 128 (more than 64 there is the cores), on one with 2 it is 64."""
    from edgecap.backends._checks import check_threads

    for cores, limit in ((2, 64), (128, 128), (None, 64)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert check_threads(1) == 1 and check_threads(limit) == limit
        with pytest.raises(ValueError, match=rf"at most {limit}\) or None, got {limit + 1}$"):
            check_threads(limit + 1)
