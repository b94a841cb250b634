"""Language-model fusion (``edgecap.decoding.fusion``): the numpy LSTM against PyTorch's, the
scorer's rows reordered with the beams, the model directory's fusion file checked, and fusion
as one more rule of the one beam loop."""

from __future__ import annotations

import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from edgecap.decoding import CaptionOptions, beam_search
from edgecap.decoding.fusion import ARRAYS, CaptionLM, Fusion, FusionScorer, NumpyPairStep, remove_fusion
from edgecap.decoding.fusion_graph import OnnxPairStep, pair_step_model
from edgecap.decoding.rules import NeverFirst
from edgecap.errors import ModelError
from edgecap.manifest import load_manifest
from fakes import END, START, PrefixHashBackend
from helpers import copy_model, edit_manifest, without_optional_files

torch = pytest.importorskip("torch")

V, E, H = 14, 6, 5


def _torch_lm(seed: int, hidden: int = H):
    torch.manual_seed(seed)
    embed, lstm = torch.nn.Embedding(V, E), torch.nn.LSTM(E, hidden, batch_first=True)
    out = torch.nn.Linear(hidden, V)
    arrays = {
        "embed": embed.weight,
        "w_ih": lstm.weight_ih_l0,
        "w_hh": lstm.weight_hh_l0,
        "bias": lstm.bias_ih_l0 + lstm.bias_hh_l0,
        "out_w": out.weight,
        "out_b": out.bias,
    }
    return (embed, lstm, out), {k: v.detach().numpy().astype(np.float32) for k, v in arrays.items()}


@pytest.mark.parametrize("rows", [2, 7])  # a matrix-vector product per row / blocked products
def test_the_numpy_lm_is_pytorchs_lstm(rows):
    (embed, lstm, out), arrays = _torch_lm(0)
    words = torch.tensor([[1, 5, 7, 9, 2], [1, 4, 4, 13, 6]] * 3 + [[1, 3, 8, 8, 12]])[:rows]
    with torch.no_grad():
        expected = torch.log_softmax(out(lstm(embed(words))[0]), -1).numpy()
    lm = CaptionLM(arrays)
    h, c = lm.zero_state(rows)
    for t in range(words.shape[1]):
        logp, h, c = lm.step(words[:, t].numpy(), h, c)
        np.testing.assert_allclose(logp, expected[:, t], atol=1e-5)


def _fusion(tmp_path, weight=0.5):
    for role, seed in (("everyday", 1), ("in_domain", 2)):
        np.savez(tmp_path / f"lm_{role}.npz", **_torch_lm(seed)[1])
    spec = {
        "format": "edgecap-fusion/1",
        "weight": weight,
        "everyday": {"file": "lm_everyday.npz"},
        "in_domain": {"file": "lm_in_domain.npz"},
    }
    (tmp_path / "fusion.json").write_text(json.dumps(spec))
    return Fusion.load(tmp_path, V)


def test_the_scorer_follows_its_rows_and_gives_the_density_ratio(tmp_path):
    fusion = _fusion(tmp_path)
    scorer = FusionScorer(fusion, np.full(3, 0.5))
    image_index = np.zeros(3, np.int32)
    first = scorer.bias(0, np.full(3, START, np.int32), image_index)
    # step 2: rows 0 and 1 continue row 2 (word 5), row 2 continues row 0 (word 7)
    second = scorer.bias(1, np.array([5, 5, 7], np.int32), np.array([2, 2, 0], np.int32))
    # step 3: row 0 continues row 2 ("7"), row 1 row 0 ("5"), row 2 row 1 ("5")
    third = scorer.bias(2, np.array([8, 9, 8], np.int32), np.array([2, 0, 1], np.int32))

    def alone(words):  # each LM run on one row's words by itself
        out = []
        for lm in (fusion.everyday, fusion.in_domain):
            h, c = lm.zero_state(1)
            for w in words:
                logp, h, c = lm.step(np.array([w]), h, c)
            out.append(logp[0])
        return 0.5 * (out[0] - out[1])

    np.testing.assert_allclose(first[0], alone([START]), atol=1e-6)
    np.testing.assert_allclose(second[0], alone([START, 5]), atol=1e-6)
    np.testing.assert_allclose(second[2], alone([START, 7]), atol=1e-6)
    np.testing.assert_allclose(third[0], alone([START, 7, 8]), atol=1e-6)
    np.testing.assert_allclose(third[1], alone([START, 5, 9]), atol=1e-6)
    np.testing.assert_allclose(third[2], alone([START, 5, 8]), atol=1e-6)
    assert second.dtype == np.float32 and second.shape == (3, V)


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_the_onnxruntime_step_is_pytorchs_two_lstms_and_their_weighted_ratio(rows):
    """One onnxruntime run per step gives each row's weight x (log p_everyday - log p_in_domain)
    of PyTorch's two LSTMs (of different sizes), step after step with the states carried."""
    pytest.importorskip("onnxruntime")
    (everyday, a_everyday), (in_domain, a_in_domain) = _torch_lm(1), _torch_lm(2, hidden=H + 3)
    words = torch.tensor([[1, 5, 7, 9, 2], [1, 4, 4, 13, 6], [1, 3, 8, 8, 12]] * 3)[:rows]
    weights = np.linspace(0.25, 1.5, rows, dtype=np.float32)[:, None]
    with torch.no_grad():
        log_p = [
            torch.log_softmax(out(lstm(embed(words))[0]), -1).numpy()
            for embed, lstm, out in (everyday, in_domain)
        ]
    expected = weights[:, None] * (log_p[0] - log_p[1])  # (rows, steps, V)
    lms = CaptionLM(a_everyday), CaptionLM(a_in_domain)
    step, states = OnnxPairStep(*lms), [lm.zero_state(rows) for lm in lms]
    for t in range(words.shape[1]):
        bias, states = step(words[:, t].numpy(), states, weights)
        np.testing.assert_allclose(bias, expected[:, t], atol=1e-5)
        assert bias.dtype == np.float32 and bias.shape == (rows, V)


def test_the_step_graph_is_a_valid_onnx_model():
    """What the hand-written protobuf encodes, read back by the onnx package and checked with
    its shape inference: the inputs and outputs the step feeds and reads, at their shapes."""
    onnx = pytest.importorskip("onnx")
    lms = CaptionLM(_torch_lm(1)[1]), CaptionLM(_torch_lm(2, hidden=H + 3)[1])
    model = onnx.load_from_string(pair_step_model(*lms))
    onnx.checker.check_model(model, full_check=True)

    def shapes(values):
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        return {v.name: dims(v) for v in values}

    assert shapes(model.graph.input) == {
        "tokens": ["rows"],
        "everyday_h": ["rows", H],
        "everyday_c": ["rows", H],
        "in_domain_h": ["rows", H + 3],
        "in_domain_c": ["rows", H + 3],
        "weights": ["rows", 1],
    }
    assert shapes(model.graph.output)["bias"] == ["rows", V]
    assert {t.name: list(t.dims) for t in model.graph.initializer}["in_domain_out_w_t"] == [H + 3, V]


def test_the_hand_written_protobuf_is_byte_for_byte_what_protobuf_writes():
    """The step graph's bytes are those the protobuf library writes for the model it reads from
    them (each field where protobuf puts it, no field read as another), the model named as
    edgecap's, each node named after its op and output; a node's negative attribute (an int64
    below zero: ten bytes, two's complement) is encoded as onnx.helper encodes it."""
    onnx = pytest.importorskip("onnx")
    from edgecap.decoding.fusion_graph import _node

    lms = CaptionLM(_torch_lm(1)[1]), CaptionLM(_torch_lm(2, hidden=H + 3)[1])
    written = pair_step_model(*lms)
    model = onnx.load_from_string(written)
    assert model.SerializeToString() == written
    assert model.producer_name == "edgecap"
    assert all(n.name == f"{n.op_type}_{n.output[0]}" for n in model.graph.node)
    for axis in (-1, -2, 1, 300):
        want = onnx.helper.make_node("LogSoftmax", ["x"], ["y"], name="LogSoftmax_y", axis=axis)
        assert _node("LogSoftmax", ["x"], ["y"], axis=axis) == want.SerializeToString(), axis


def test_the_step_graph_loads_on_the_oldest_onnxruntime_edgecap_takes():
    """edgecap[cpu] asks for onnxruntime >= 1.16 (pyproject.toml); onnxruntime 1.16 reads ONNX
    IR version 9 and opset 19 at most (onnxruntime's compatibility table, ONNX 1.14). A newer
    IR version would make the fusion fall back to numpy (slower, with a warning) there."""
    onnx = pytest.importorskip("onnx")
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"onnxruntime>=1.16"' in pyproject  # the table row this test reads
    lms = CaptionLM(_torch_lm(1)[1]), CaptionLM(_torch_lm(2)[1])
    model = onnx.load_from_string(pair_step_model(*lms))
    assert model.ir_version <= 9
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]  # <= 19


def test_the_onnxruntime_step_runs_on_one_thread():
    """The fused step's products are small: one onnxruntime thread (no pool of its own spinning
    beside the decoder's, the class's docstring), without spin-waiting, as every edgecap
    session."""
    pytest.importorskip("onnxruntime")
    step = OnnxPairStep(CaptionLM(_torch_lm(1)[1]), CaptionLM(_torch_lm(2)[1]))
    options = step._session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_without_onnxruntime_the_fusion_runs_in_numpy_alike(tmp_path, monkeypatch):
    """A package without onnxruntime (the torch backend alone) still fuses: in numpy, the same
    biases as the onnxruntime step."""
    pytest.importorskip("onnxruntime")
    with_ort = _fusion(tmp_path)
    assert isinstance(with_ort.step, OnnxPairStep)  # made (and kept) while onnxruntime imports
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # ``import onnxruntime`` raises ImportError
    without = Fusion.load(tmp_path, V)
    assert isinstance(without.step, NumpyPairStep)
    weights = np.array([[0.5], [1.0], [2.0]], np.float32)
    states = {id(f): [lm.zero_state(3) for lm in (f.everyday, f.in_domain)] for f in (with_ort, without)}
    for tokens in ([START] * 3, [5, 7, 9], [8, 8, 12]):
        biases = []
        for f in (with_ort, without):
            bias, states[id(f)] = f.step(np.array(tokens, np.int32), states[id(f)], weights)
            biases.append(bias)
        np.testing.assert_allclose(biases[0], biases[1], atol=1e-5)


def test_an_onnxruntime_that_cannot_load_the_step_leaves_numpy_with_a_warning(tmp_path, monkeypatch):
    """onnxruntime installed but unable to run the step's graph (too old for opset 17, say): a
    warning that says so, and the numpy step with the same biases, made once."""
    pytest.importorskip("onnxruntime")
    import edgecap.decoding.fusion_graph as fusion_graph

    reference = _fusion(tmp_path)
    assert isinstance(reference.step, OnnxPairStep)  # made before onnxruntime is made to refuse
    tries = []

    def refuse(*args):
        tries.append(args)
        raise RuntimeError("Fail: opset 17 is not supported\nmore detail")

    monkeypatch.setattr(fusion_graph, "OnnxPairStep", refuse)
    fusion = Fusion.load(tmp_path, V)
    with pytest.warns(
        RuntimeWarning, match=r"numpy \(slower\).*RuntimeError: Fail: opset 17 is not supported\)"
    ):
        step = fusion.step
    assert isinstance(step, NumpyPairStep) and fusion.step is step and len(tries) == 1
    weights = np.full((2, 1), 0.5, np.float32)
    tokens = np.array([START, START], np.int32)
    zero = [lm.zero_state(2) for lm in (fusion.everyday, fusion.in_domain)]
    np.testing.assert_allclose(
        step(tokens, zero, weights)[0], reference.step(tokens, zero, weights)[0], atol=1e-5
    )


def test_fusion_is_one_more_rule_of_the_loop(tmp_path):
    """Weight 0 is the plain search exactly; a weight changes some captions, and the captions'
    own scores stay the caption model's (the fused part only ranks)."""
    fusion = _fusion(tmp_path)
    backend = PrefixHashBackend(vocab_size=V, top_k=8, end_bias=-1.0)
    seeds = np.arange(12)
    options = CaptionOptions(beam_size=3, max_length=8, no_repeat_ngram=0)

    def captions(weight):
        scorers = [] if weight is None else [partial(fusion.scorer, weight)]
        return beam_search(
            backend, backend.encode(seeds), options, START, END, filters=[NeverFirst([END])], scorers=scorers
        )

    plain, zero, fused = captions(None), captions(0.0), captions(2.0)
    assert [h[0].tokens for h in zero] == [h[0].tokens for h in plain]
    assert [h[0].tokens for h in fused] != [h[0].tokens for h in plain]
    for hyps in fused:  # log_prob is the fake model's own, recomputed from its distributions
        state, total, prev = int(seeds[fused.index(hyps)]), 0.0, START
        for token in [*hyps[0].tokens, END] if hyps[0].finished else hyps[0].tokens:
            state = PrefixHashBackend.next_state(state, prev)
            total += float(backend.logprobs(state)[token])
            prev = token
        assert hyps[0].log_prob == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("version", ["2", "10"])
def test_a_fusion_file_of_a_newer_format_says_to_upgrade_edgecap(tmp_path, version):
    """A model folder from a newer edgecap, its fusion.json "edgecap-fusion/2": it was called a
    "malformed fusion file ...; re-make it", which the user cannot. Now it says that a newer
    edgecap made it, as the manifest does; an older or another kind of format is still malformed."""
    _fusion(tmp_path)
    spec = json.loads((tmp_path / "fusion.json").read_text())
    found = f"edgecap-fusion/{version}"
    (tmp_path / "fusion.json").write_text(json.dumps({**spec, "format": found, "weight": "changed"}))
    with pytest.raises(ModelError) as caught:
        Fusion.load(tmp_path, V)
    assert str(caught.value) == (
        f"{tmp_path / 'fusion.json'}: made by a newer edgecap (format {found!r}; this edgecap "
        "reads edgecap-fusion/1); upgrade edgecap"
    )
    for other in ("edgecap-fusion/0", "edgecap-confidence/2", "edgecap-fusion/2b"):
        (tmp_path / "fusion.json").write_text(json.dumps({**spec, "format": other}))
        with pytest.raises(ModelError, match="malformed fusion file .format is"):
            Fusion.load(tmp_path, V)


def test_a_broken_fusion_file_is_a_model_error_naming_it(tmp_path):
    _fusion(tmp_path)
    assert Fusion.load(tmp_path / "nowhere", V) is None  # no fusion.json: no fusion
    with pytest.raises(ModelError, match="belongs to another model"):
        Fusion.load(tmp_path, V + 1)
    spec = json.loads((tmp_path / "fusion.json").read_text())
    for change, message in (
        ({"format": "other"}, "format"),
        ({"weight": 7}, "weight"),
        ({"everyday": {"file": "../x.npz"}}, "file name"),
        ({"everyday": {"file": "lm_everyday.npz", "sha256": "0" * 64}}, "checksum"),
    ):
        (tmp_path / "fusion.json").write_text(json.dumps({**spec, **change}))
        with pytest.raises(ModelError, match=message):
            Fusion.load(tmp_path, V)
    gate = {"class_log_prior": [0.0] * 10, "full_below": -1.0, "none_above": 1.0}
    (tmp_path / "fusion.json").write_text(json.dumps({**spec, "gate": gate}))
    with pytest.raises(ModelError, match="10 classes, the encoder 1000"):
        Fusion.load(tmp_path, V, n_classes=1000)
    assert Fusion.load(tmp_path, V, n_classes=10).gate is not None
    (tmp_path / "fusion.json").write_text(json.dumps(spec))
    np.savez(tmp_path / "lm_everyday.npz", **{k: np.zeros(3) for k in ARRAYS})
    with pytest.raises(ModelError, match="lm_everyday.npz: unreadable"):
        Fusion.load(tmp_path, V)


class _OpensWhenUnpickled:
    """Unpickled, it opens ``path`` for writing (making the file): a stand-in for the code a
    pickle in a model file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_language_model_file_holding_a_pickle_is_refused_unopened(tmp_path):
    """reliability.md: edgecap never unpickles anything. An lm_*.npz whose out_b is an object
    array (a pickle, as np.savez writes one) is an unreadable language model, and the pickle's
    code never runs."""
    _fusion(tmp_path)
    arrays = dict(np.load(tmp_path / "lm_everyday.npz"))
    ran = tmp_path / "the pickle ran"
    arrays["out_b"] = np.array([_OpensWhenUnpickled(ran)], dtype=object)
    np.savez(tmp_path / "lm_everyday.npz", **arrays)
    with pytest.raises(ModelError, match="lm_everyday.npz: unreadable"):
        Fusion.load(tmp_path, V)
    assert not ran.exists()


@pytest.mark.parametrize(
    ("names", "removed"),
    [
        (("lm_a.npz", "lm_b.npz"), {"lm_a.npz", "lm_b.npz"}),
        (("encoder.onnx", "lm_b.npz"), {"lm_b.npz"}),  # a model file: never removed
        (("../outside.npz", "sub/lm.npz"), set()),  # not a file name in the directory
    ],
)
def test_removing_a_fusion_takes_its_language_models_files_and_nothing_else(tmp_path, names, removed):
    """``remove_fusion`` (a model replaced by ``edgecap export --force`` or ``convert --force``):
    fusion.json goes, with the ``.npz`` files in the directory it names; a name that is a model
    file or not a plain file name stays, as every other file."""
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    others = ["encoder.onnx", "vocab.json", "notes.npz", "sub/lm.npz", "lm_a.npz", "lm_b.npz"]
    for name in [*others, "../outside.npz"]:
        (model / name).write_bytes(b"x")
    spec = {"everyday": {"file": names[0]}, "in_domain": {"file": names[1]}, "weight": 0.5}
    (model / "fusion.json").write_text(json.dumps(spec))
    remove_fusion(model)
    assert not (model / "fusion.json").exists() and (tmp_path / "outside.npz").exists()
    assert {name for name in others if not (model / name).exists()} == removed


def test_an_unreadable_fusion_file_is_removed_by_itself(tmp_path):
    for text in ("{not json", '{"everyday": 3}', "[]"):
        (tmp_path / "lm_everyday.npz").write_bytes(b"x")
        (tmp_path / "fusion.json").write_text(text)
        remove_fusion(tmp_path)
        assert not (tmp_path / "fusion.json").exists() and (tmp_path / "lm_everyday.npz").exists()
    remove_fusion(tmp_path)  # none there: nothing to do
    (tmp_path / "fusion.json").symlink_to(tmp_path / "gone" / "fusion.json")  # a dangling link
    remove_fusion(tmp_path)
    assert not (tmp_path / "fusion.json").is_symlink() and not (tmp_path / "gone").exists()


@pytest.mark.parametrize("odd", ["lm\x00.npz", "x" * 300 + ".npz", "folder.npz"])
def test_a_fusion_file_naming_what_cannot_be_removed_is_still_removed(tmp_path, odd):
    """A fusion.json (hand-edited, corrupted) naming no removable file (a NUL in the name, a
    name past the file system's 255 bytes, a folder): ``edgecap export --force`` and ``convert
    --force`` replace the model without a traceback (ValueError: embedded null byte, OSError:
    file name too long, IsADirectoryError). fusion.json goes, with the other language model's
    file it names; the folder stays, and what is in it."""
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "folder.npz" / "keep").write_bytes(b"x")
    (tmp_path / "lm_b.npz").write_bytes(b"x")
    spec = {"everyday": {"file": odd}, "in_domain": {"file": "lm_b.npz"}, "weight": 0.5}
    (tmp_path / "fusion.json").write_text(json.dumps(spec))
    remove_fusion(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.npz"]
    assert (tmp_path / "folder.npz" / "keep").exists()


def test_the_captioner_uses_its_models_fusion(default_model_dir, tmp_path, monkeypatch):
    """A model directory with a fusion file: the Captioner loads it (and makes its step) and
    its weight is the default; --fusion-weight 0 gives the captions without it."""
    from edgecap import Captioner
    from edgecap.training.language_model import install

    model = tmp_path / "model"
    without_optional_files(copy_model(default_model_dir, model), "fusion")
    vocab_size = json.loads((model / "manifest.json").read_text())["dims"]["vocab_size"]
    from edgecap.manifest import file_sha256

    for role, seed in (("everyday", 3), ("in_domain", 4)):
        _random_lm(tmp_path / f"{role}.npz", vocab_size, file_sha256(model / "vocab.json"), seed=seed)
    install(model, tmp_path / "everyday.npz", tmp_path / "in_domain.npz", 1.5)
    photo = "edgecap/assets/examples/coffee.png"
    fused = Captioner(model)
    assert fused.fusion is not None and fused.fusion.weight == 1.5
    # its step is made with the Captioner, not on the first caption (a camera loop's first frame)
    assert isinstance(vars(fused.fusion).get("step"), OnnxPairStep)
    off = Captioner(model, fusion_weight=0.0)
    assert "step" not in vars(off.fusion)  # fusion off: no session made for it
    plain = Captioner(default_model_dir, fusion_weight=0.0)
    assert off.caption(photo).text == plain.caption(photo).text
    assert fused.caption(photo).text != off.caption(photo).text  # random LMs, weight 1.5

    # onnxruntime unable to load the step: the warning points at the line that made the Captioner
    import edgecap.decoding.fusion_graph as fusion_graph

    def refuse(*args):
        raise MemoryError()

    monkeypatch.setattr(fusion_graph, "OnnxPairStep", refuse)
    with pytest.warns(RuntimeWarning, match=r"could not load their step \(MemoryError\)$") as warned:
        fallback = Captioner(model)
    assert [w.filename for w in warned] == [__file__]
    assert fallback.caption(photo).text == fused.caption(photo).text


def test_an_install_names_the_fusion_file_in_the_manifest(default_model_dir, tmp_path):
    """A model without language models (its manifest names no fusion file) given them by
    ``install``: its manifest names fusion.json afterwards, the rest of it as it was (a role this
    edgecap does not know too), so that a copy of the folder without fusion.json is refused
    instead of captioning without the language models without a word."""
    from edgecap.manifest import file_sha256
    from edgecap.training.language_model import install

    model = without_optional_files(copy_model(default_model_dir, tmp_path / "model"), "fusion")
    edit_manifest(model, lambda data: data["files"].update(future="future.bin"))
    before = json.loads((model / "manifest.json").read_text())
    assert "fusion" not in before["files"]
    vocab_size = before["dims"]["vocab_size"]
    for role, seed in (("everyday", 3), ("in_domain", 4)):
        _random_lm(tmp_path / f"{role}.npz", vocab_size, file_sha256(model / "vocab.json"), seed=seed)
    install(model, tmp_path / "everyday.npz", tmp_path / "in_domain.npz", 1.5)
    after = json.loads((model / "manifest.json").read_text())
    assert after["files"] == {**before["files"], "fusion": "fusion.json"}
    assert {**after, "files": None} == {**before, "files": None}
    (model / "fusion.json").unlink()
    with pytest.raises(ModelError, match=r"fusion.json is missing: .*copy the whole model directory"):
        load_manifest(model)
    # an install into it is not refused for the file it writes: it mends the model
    install(model, tmp_path / "everyday.npz", tmp_path / "in_domain.npz", 1.5)
    assert load_manifest(model).files["fusion"] == "fusion.json"


def test_an_install_into_a_folder_of_links_leaves_the_linked_model_as_it_was(default_model_dir, tmp_path):
    """``install`` into a folder of links to another model's files (a model store, ``cp -rs``):
    that folder gets fusion.json, the two lm_*.npz and confidence.json of its own (the links
    replaced) and its new weight, while the linked model keeps every file byte for byte and its
    own weight (was: all four written through the links into it, which then captioned with the
    new language models). Removing the folder's fusion (``remove_fusion``, what ``export
    --force`` and ``convert --force`` do) removes the links, not the files they lead to."""
    from edgecap.manifest import file_sha256
    from edgecap.training.language_model import install

    def changed(folder, before):  # the names of the files that are not as they were
        now = {p.name: p.read_bytes() for p in folder.iterdir()}
        return sorted(name for name in {*now, *before} if now.get(name) != before.get(name))

    store = copy_model(default_model_dir, tmp_path / "store")
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    own_weight = json.loads(before["fusion.json"])["weight"]
    vocab_size = json.loads(before["manifest.json"])["dims"]["vocab_size"]
    links, links_too = tmp_path / "links", tmp_path / "links_too"
    for folder in (links, links_too):
        folder.mkdir()
        for path in store.iterdir():
            (folder / path.name).symlink_to(path)
    for role, seed in (("everyday", 3), ("in_domain", 4)):
        _random_lm(tmp_path / f"{role}.npz", vocab_size, file_sha256(store / "vocab.json"), seed=seed)
    install(links, tmp_path / "everyday.npz", tmp_path / "in_domain.npz", 1.5)
    assert changed(store, before) == []
    written = ["confidence.json", "fusion.json", "lm_everyday.npz", "lm_in_domain.npz"]
    assert sorted(p.name for p in links.iterdir() if not p.is_symlink()) == written
    assert sorted(p.name for p in links.iterdir()) == sorted(before)  # nothing else left there
    assert Fusion.load(links, vocab_size).weight == 1.5 and load_manifest(links).files["fusion"]
    assert Fusion.load(store, vocab_size).weight == own_weight
    # the weight its confidence model was fitted at: the linked model's, now written in its own file
    assert json.loads((links / "confidence.json").read_text())["fusion_weight"] == own_weight

    remove_fusion(links_too)
    assert changed(store, before) == []
    assert sorted(p.name for p in links_too.iterdir()) == sorted(set(before) - set(written[1:]))


def test_the_gate_gives_training_like_photos_no_fusion(tmp_path):
    """Gate.fit on "training photos" whose classes are mostly 0 and 1: a photo of class 0 is
    typical (no fusion: its captions are the plain search's), one of class 3 is not (the full
    weight), one in between gets a share."""
    from edgecap.decoding.fusion import Gate

    rng = np.random.default_rng(0)
    train = np.zeros((200, 4))
    train[np.arange(200), rng.choice([0, 1, 2], 200, p=[0.6, 0.35, 0.05])] = 1.0
    gate = Gate.fit(train * 0.9 + 0.025)
    typical, unusual = np.array([[0.925, 0.025, 0.025, 0.025]]), np.array([[0.0, 0.0, 0.0, 1.0]])
    assert gate(typical)[0] == 0.0 and gate(unusual)[0] == 1.0
    middle = 0.5 * typical + 0.5 * unusual
    assert 0.0 < gate(middle)[0] < 1.0
    # in the search: per image, the gate's share of the weight
    fusion = _fusion(tmp_path)
    fusion = Fusion(fusion.everyday, fusion.in_domain, fusion.weight, fusion.info, gate)
    scorer = fusion.scorer(2.0, np.array([0, 0, 1, 1], np.int32), class_probs=np.vstack([typical, unusual]))
    np.testing.assert_array_equal(scorer.weights[:, 0], [0.0, 0.0, 2.0, 2.0])
    bias = scorer.bias(0, np.full(4, START, np.int32), np.array([0, 0, 1, 1], np.int32))
    assert not bias[:2].any() and bias[2:].any()
    # only typical photos: no language-model work at all, no bias
    idle = fusion.scorer(2.0, np.array([0, 0], np.int32), class_probs=typical)
    assert idle.bias(0, np.full(2, START, np.int32), np.array([0, 0], np.int32)) is None


@pytest.mark.parametrize("kind", ["fifo", "binary"])
def test_the_lm_trainer_refuses_caption_text_it_cannot_read_in_one_line(tmp_path, kind, default_model_dir):
    from edgecap.training.language_model import main

    text = tmp_path / "captions.txt"
    if kind == "fifo":
        os.mkfifo(text)  # read whole, a pipe would hang the trainer
    else:
        text.write_bytes(b"a dog runs\n\xff\xfe on grass\n")
    with pytest.raises(SystemExit) as raised:
        main(["--text", str(text), "--model", str(default_model_dir), "--out", str(tmp_path / "lm.npz")])
    message = str(raised.value)
    assert message.startswith(f"{text}: ") and "\n" not in message
    assert ("not a regular file" in message) if kind == "fifo" else ("not UTF-8" in message)
    assert not (tmp_path / "lm.npz").exists()


def test_the_fusion_weight_option_reaches_the_search(tmp_path):
    """``CaptionOptions.fusion_weight`` through ``search`` (what the Captioner calls): None is
    the model's own weight (fusion.json's 2.0), 0 is the plain search, any other value is that
    weight, never the model's; on the fake model, not the shipped one (the quick subset)."""
    from edgecap.decoding import search

    fusion = _fusion(tmp_path, weight=2.0)
    backend = PrefixHashBackend(vocab_size=V, top_k=8, end_bias=-1.0)
    seeds = np.arange(6)

    def by_option(weight):
        options = CaptionOptions(beam_size=3, max_length=6, no_repeat_ngram=0, fusion_weight=weight)
        found = search(backend, backend.encode(seeds), options, START, END, V, fusion=fusion)
        return [h[0].tokens for h in found]

    def by_loop(weight):  # the loop given the weight's scorer directly
        options = CaptionOptions(beam_size=3, max_length=6, no_repeat_ngram=0)
        scorers = [partial(fusion.scorer, weight)] if weight else []
        found = beam_search(
            backend, backend.encode(seeds), options, START, END, filters=[NeverFirst([END])], scorers=scorers
        )
        return [h[0].tokens for h in found]

    plain, model_weight, half = by_loop(0.0), by_loop(2.0), by_loop(0.5)
    assert plain != half != model_weight != plain  # the three weights give three sets of captions
    assert by_option(None) == model_weight
    assert by_option(0.0) == plain
    assert by_option(0.5) == half


def test_the_gate_fit_on_the_training_photos_gives_5_percent_full_weight_and_85_none():
    """The module's rule: full weight below the typicality of 95% of the training photos (the
    5th percentile), none above the 15th: over the training photos themselves (200 distinct
    typicalities), 10 get the full weight, 170 none, the 20 between a share."""
    from edgecap.decoding.fusion import Gate

    x = np.linspace(0.01, 0.59, 200)  # q = [0.3, 0.7]: typicality falls as x grows
    train = np.stack([x, 1 - x], axis=1)
    gate = Gate.fit(train)
    np.testing.assert_allclose(gate.class_log_prior, np.log([0.6, 1.4]), atol=1e-6)
    shares = gate(train)
    assert (shares == 1.0).sum() == 10 and (shares == 0.0).sum() == 170
    assert ((shares > 0) & (shares < 1)).sum() == 20


def test_a_model_directorys_gate_is_the_one_written(tmp_path):
    """fusion.json's gate as written (``Gate.to_json``'s fields): typicality sum_c p(c) *
    class_log_prior(c); full weight at or below full_below (-1), none at or above none_above
    (1), linear between: with the prior [1, -1], class probabilities [0, 1] -> typicality -1
    -> share 1; [0.5, 0.5] -> 0 -> 0.5; [0.75, 0.25] -> 0.5 -> 0.25; [1, 0] -> 1 -> 0."""
    _fusion(tmp_path)
    spec = json.loads((tmp_path / "fusion.json").read_text())
    gate = {"class_log_prior": [1.0, -1.0], "full_below": -1.0, "none_above": 1.0}
    (tmp_path / "fusion.json").write_text(json.dumps({**spec, "gate": gate}))
    loaded = Fusion.load(tmp_path, V, n_classes=2).gate
    probs = np.array([[0.0, 1.0], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]])
    np.testing.assert_allclose(loaded(probs), [1.0, 0.5, 0.25, 0.0], atol=1e-6)
    assert loaded.to_json() == gate


# -- the language models' trainer and installer (edgecap.training.language_model) ----------------
def test_the_lm_trainer_keeps_captions_of_a_word_or_more_cut_to_max_words():
    """``encode_all``: <start>, the words (<unk> for one the vocabulary lacks), <end>; a caption
    with no word is dropped, one of more than ``max_words`` (2) words keeps its first 2 and its
    <end>, one of exactly 2 is kept whole. Ids: <pad> 0, <start> 1, <end> 2, <unk> 3, then
    a 4, dog 5, runs 6."""
    from edgecap.training.language_model import encode_all
    from edgecap.vocab import SPECIALS, Vocabulary

    vocab = Vocabulary([*SPECIALS, "a", "dog", "runs"])
    got = encode_all(["a dog runs fast", "dog", "", "...", "zebra", "a dog"], vocab, max_words=2)
    assert got == [[1, 4, 5, 2], [1, 5, 2], [1, 3, 2], [1, 4, 5, 2]]


def _train_lm(tmp_path, model_dir, captions: list[str], *options: str):
    """Train a caption LM (embed 4, hidden 3, no dropout) with the module's command line;
    -> (the .npz, its JSON, the epochs' lines it printed but the last)."""
    from edgecap.training.language_model import main

    text = tmp_path / "captions.txt"
    text.write_text("\n".join(captions) + "\n")
    out = tmp_path / "lm.npz"
    argv = ["--text", str(text), "--model", str(model_dir), "--out", str(out)]
    main([*argv, "--embed", "4", "--hidden", "3", "--dropout", "0", *options])
    return out, json.loads(out.with_suffix(".json").read_text())


def _numpy_perplexity(npz, rows: list[list[int]]) -> float:
    """exp of the mean over every predicted word (each word after <start>, and <end>) of
    -log p(word | the words before it), run by the runtime's numpy LM on the written weights."""
    import math

    with np.load(npz) as arrays:
        lm = CaptionLM(dict(arrays))
    nll, words = 0.0, 0
    for ids in rows:
        h, c = lm.zero_state(1)
        for now, following in zip(ids, ids[1:]):
            logp, h, c = lm.step(np.array([now]), h, c)
            nll, words = nll - float(logp[0, following]), words + 1
    return math.exp(nll / words)


def test_the_lm_trainers_dev_perplexity_is_the_written_weights_per_word(tmp_path, default_model_dir):
    """With every caption held out (--dev-fraction 1: no training step), the dev perplexity the
    trainer reports is that of the weights it writes, as the numpy LM runs them (torch's two
    LSTM biases summed, gate order i, f, g, o), per predicted word: 1 + 2 + 4 + 9 words and an
    <end> each = 20, the padding of the shorter captions in a batch of 2 not counted. The JSON
    says what it was trained on and the model vocabulary's checksum."""
    from edgecap.manifest import file_sha256
    from edgecap.vocab import Vocabulary

    captions = ["dogs", "a dog", "a dog runs fast", "a man rides a red bike down the street"]
    out, meta = _train_lm(
        tmp_path, default_model_dir, captions, "--dev-fraction", "1", "--epochs", "1", "--batch-size", "2"
    )
    vocab = Vocabulary.load(default_model_dir / "vocab.json")
    rows = [vocab.encode(c) for c in captions]
    assert sum(len(r) - 1 for r in rows) == 20
    [epoch] = meta["history"]
    assert epoch["dev_perplexity"] == pytest.approx(_numpy_perplexity(out, rows), rel=1e-5)
    assert meta["captions"] == {"train": 0, "dev": 4}
    assert (meta["vocab_size"], meta["embed"], meta["hidden"]) == (len(vocab), 4, 3)
    assert meta["vocab_sha256"] == file_sha256(default_model_dir / "vocab.json")


def test_the_lm_trainer_keeps_the_weights_of_its_best_dev_epoch(tmp_path, default_model_dir, capsys):
    """10 copies of one caption; the default dev share (2%: 0.2 captions) still holds one out,
    and it is the same caption. Epoch 1 learns it (Adam, lr 0.05), epoch 2 runs at lr -0.05
    (--lr-decay -1: gradient ascent on the same caption), so its dev perplexity is worse: the
    written weights are epoch 1's (their numpy perplexity is epoch 1's printed figure)."""
    from edgecap.vocab import Vocabulary

    caption = "a dog runs on the grass"
    options = ("--epochs", "2", "--lr", "0.05", "--lr-decay", "-1", "--batch-size", "3")
    out, meta = _train_lm(tmp_path, default_model_dir, [caption] * 10, *options)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()[:-1]]
    assert [e["epoch"] for e in printed] == [1, 2]
    first, second = (e["dev_perplexity"] for e in printed)
    assert second > first
    row = Vocabulary.load(default_model_dir / "vocab.json").encode(caption)
    assert _numpy_perplexity(out, [row]) == pytest.approx(first, rel=1e-5)
    assert meta["captions"] == {"train": 9, "dev": 1}


def test_the_lm_trainers_learning_rate_is_multiplied_by_the_decay_after_each_epoch(
    tmp_path, default_model_dir, monkeypatch
):
    """--lr 0.01 --lr-decay 0.5 over 3 epochs of one batch each (4 captions, 1 held out): the
    optimiser's steps run at 0.01, 0.005 and 0.0025."""
    import torch

    rates: list[float] = []

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    captions = ["a dog", "a dog runs", "two dogs play", "a cat sleeps"]
    _train_lm(tmp_path, default_model_dir, captions, "--epochs", "3", "--lr", "0.01", "--lr-decay", "0.5")
    assert rates == pytest.approx([0.01, 0.005, 0.0025], rel=1e-12)


def _random_lm(path, vocab_size: int, vocab_sha256: str, perplexities=(1.0,), seed: int = 3):
    """A random caption LM (embed 4, hidden 3) at ``path`` with the JSON beside it that the
    trainer writes (only the fields ``install`` reads)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "embed": rng.normal(size=(vocab_size, 4)),
        "w_ih": rng.normal(size=(12, 4)),
        "w_hh": rng.normal(size=(12, 3)),
        "bias": np.zeros(12),
        "out_w": rng.normal(size=(vocab_size, 3)) * 3,
        "out_b": np.zeros(vocab_size),
    }
    np.savez(path, **arrays)
    history = [{"epoch": i + 1, "dev_perplexity": p} for i, p in enumerate(perplexities)]
    path.with_suffix(".json").write_text(json.dumps({"vocab_sha256": vocab_sha256, "history": history}))
    return path


def test_an_install_refused_for_its_in_domain_lm_leaves_the_model_as_it_was(default_model_dir, tmp_path):
    """A copy of the shipped model (its own fusion.json and LMs); installing a new everyday LM
    with an in-domain LM trained on another vocabulary is refused, and the model directory is
    left as it was: every file byte for byte, so it still loads and captions as before (was: the
    everyday LM copied in before the in-domain one was checked, so the refused install left
    a fusion.json whose checksum no longer matched: the model would not load)."""
    from edgecap import Captioner
    from edgecap.manifest import file_sha256
    from edgecap.training.language_model import install

    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    vocab_size = json.loads((model / "manifest.json").read_text())["dims"]["vocab_size"]
    everyday = _random_lm(tmp_path / "everyday.npz", vocab_size, file_sha256(model / "vocab.json"))
    in_domain = _random_lm(tmp_path / "in_domain.npz", vocab_size, "0" * 64, seed=4)
    with pytest.raises(SystemExit, match="in_domain.npz: trained on another vocabulary"):
        install(model, everyday, in_domain, 1.5)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    photo = "edgecap/assets/examples/coffee.png"
    assert Captioner(model).caption(photo).text == Captioner(default_model_dir).caption(photo).text


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"history": []},
        {"history": [{"epoch": 1}]},
        {"history": [{"dev_perplexity": "high"}]},
        {"history": 3},
    ],
)
def test_an_lm_record_without_its_epochs_is_refused_in_one_line(default_model_dir, tmp_path, record):
    """An LM whose JSON has no epochs with a dev perplexity (not the trainer's record): a
    SystemExit naming the file, not a KeyError / TypeError traceback, and the model untouched."""
    from edgecap.manifest import file_sha256
    from edgecap.training.language_model import install

    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    vocab_size = json.loads((model / "manifest.json").read_text())["dims"]["vocab_size"]
    sha = file_sha256(model / "vocab.json")
    everyday = _random_lm(tmp_path / "everyday.npz", vocab_size, sha)
    in_domain = _random_lm(tmp_path / "in_domain.npz", vocab_size, sha, seed=4)
    in_domain.with_suffix(".json").write_text(json.dumps({"vocab_sha256": sha, **record}))
    with pytest.raises(
        SystemExit, match=r"in_domain\.json: no epochs with a dev_perplexity in its 'history'"
    ):
        install(model, everyday, in_domain, 1.5)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_installing_lms_with_a_gate_into_a_model_that_has_lms_fits_it_and_records_the_best_epochs(
    default_model_dir, tmp_path
):
    """Installed into a copy of the shipped model, which has LMs already, with the gate fitted
    on two example photos: fusion.json names the new LMs (float16 copies of their arrays) with
    each one's best (lowest) dev perplexity of its epochs, and a gate fitted on 2 photos (was:
    the new LMs copied in first, then the Captioner that fits the gate found the old
    fusion.json's checksums wrong and install failed with a ModelError, the model left broken)."""
    from edgecap.decoding.fusion import Fusion
    from edgecap.manifest import file_sha256
    from edgecap.training.language_model import install

    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    vocab_size = json.loads((model / "manifest.json").read_text())["dims"]["vocab_size"]
    sha = file_sha256(model / "vocab.json")
    everyday = _random_lm(tmp_path / "everyday.npz", vocab_size, sha, perplexities=(9.5, 7.25, 8.0))
    in_domain = _random_lm(tmp_path / "in_domain.npz", vocab_size, sha, perplexities=(6.5,), seed=4)
    photos = [Path("edgecap/assets/examples") / name for name in ("coffee.png", "rocket.jpg")]
    install(model, everyday, in_domain, 0.75, gate_photos=photos)
    spec = json.loads((model / "fusion.json").read_text())
    assert spec["weight"] == 0.75
    assert (spec["everyday"]["dev_perplexity"], spec["in_domain"]["dev_perplexity"]) == (7.25, 6.5)
    assert spec["gate"]["fitted_on"] == "2 training photos of the caption model"
    fusion = Fusion.load(model, vocab_size, n_classes=1000)
    with np.load(everyday) as arrays:
        np.testing.assert_array_equal(
            fusion.everyday.arrays["out_w"], arrays["out_w"].astype(np.float16).astype(np.float32)
        )
    assert fusion.gate is not None


def test_an_install_with_a_gate_mends_a_model_whose_fusion_no_longer_matches_its_lms(
    default_model_dir, tmp_path
):
    """A copy of the shipped model whose lm_everyday.npz is no longer the one its fusion.json's
    checksum names (what an install cut short between writing the LMs and fusion.json leaves:
    the model does not load, a ModelError naming the checksum). Installing the LMs again with
    --gate-images mends it: the gate is fitted by the model's encoder, not by a Captioner that
    loads the broken fusion.json (which failed the install with that same ModelError)."""
    from edgecap import Captioner
    from edgecap.errors import ModelError
    from edgecap.manifest import file_sha256
    from edgecap.training.language_model import install

    model = tmp_path / "model"
    shutil.copytree(default_model_dir, model)
    vocab_size = json.loads((model / "manifest.json").read_text())["dims"]["vocab_size"]
    sha = file_sha256(model / "vocab.json")
    everyday = _random_lm(tmp_path / "everyday.npz", vocab_size, sha)
    in_domain = _random_lm(tmp_path / "in_domain.npz", vocab_size, sha, seed=4)
    shutil.copyfile(everyday, model / "lm_everyday.npz")  # not the file fusion.json names
    with pytest.raises(ModelError, match="checksum mismatch"):
        Captioner(model)
    photos = [Path("edgecap/assets/examples") / name for name in ("coffee.png", "rocket.jpg")]
    install(model, everyday, in_domain, 0.75, gate_photos=photos)
    assert json.loads((model / "fusion.json").read_text())["gate"]["fitted_on"] == (
        "2 training photos of the caption model"
    )
    assert Captioner(model).caption(photos[0]).text


def test_an_install_with_a_gate_list_and_no_gate_images_is_refused(tmp_path, capsys):
    """--gate-list names photos of --gate-images (its help); given alone it had been dropped
    without a word and the language models installed with no gate, the per-photo gate the
    user asked for missing. Now a usage error (exit 2) before anything is read or written."""
    from edgecap.training.language_model import main as lm_main

    names = tmp_path / "names.txt"
    names.write_text("a.jpg\n")
    model = tmp_path / "model"  # not there: refused before it is looked at
    args = ["install", "--model", str(model), "--everyday", "e.npz", "--in-domain", "i.npz"]
    with pytest.raises(SystemExit) as exit_:
        lm_main([*args, "--weight", "0.5", "--gate-list", str(names)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: --gate-list names photos of --gate-images: give --gate-images DIR too\n"
    )
    assert not model.exists()


def test_an_install_into_a_folder_that_is_no_model_is_one_line_and_exit_2(tmp_path, capsys):
    """A --model that is not there, or is a folder without manifest.json, is said in one line on
    stderr, exit 2, as edgecap's commands say a model error (docs/cli.md); it had been a
    ModelError traceback, exit 1. Nothing is written into the folder."""
    from edgecap.training.language_model import main as lm_main

    missing = tmp_path / "nowhere"
    plain = tmp_path / "photos"
    plain.mkdir()
    for model, problem in ((missing, f"model directory not found: {missing}"), (plain, f"{plain}: not an")):
        args = ["install", "--model", str(model), "--everyday", "e.npz", "--in-domain", "i.npz"]
        assert lm_main([*args, "--weight", "0.5"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"language_model: error: {problem}") and err.count("\n") == 1, err
    assert not missing.exists() and list(plain.iterdir()) == []


def test_a_fusion_weight_for_a_model_without_language_models_is_refused(default_model_dir, tmp_path, capsys):
    """--fusion-weight X (its help: the weight of the everyday language model fused into the
    search; "a model without one has none") given for a model without fusion.json (every model
    `edgecap export` writes, so every fine-tuned one) would fuse nothing: caption, eval and
    serve say so in one line, exit 2, as caption does for --min-confidence without a
    confidence model, instead of captioning as if it had not been given. 0 (--no-fusion) is
    what such a model does anyway and is taken; the shipped model takes any weight. Before the
    fix the weight was dropped without a word."""
    from edgecap.cli import main

    model = tmp_path / "model"
    without_optional_files(copy_model(default_model_dir, model), "fusion")
    photo = "edgecap/assets/examples/chelsea.png"
    assert main(["caption", "--model", str(model), "--fusion-weight", "0.5", photo]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == (
        f"edgecap caption: error: --fusion-weight 0.5: the model {model} has no everyday caption "
        "language models (fusion.json) to fuse; leave --fusion-weight out, or train them with "
        "`python -m edgecap.training.language_model` and add them with its `install` command "
        "(`python -m edgecap.training.language_model install --help`)\n"
    )
    references = tmp_path / "refs.json"
    references.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "chelsea.png"}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "a cat on a bed"}],
            }
        )
    )
    argv = [
        "eval",
        "--images",
        "edgecap/assets/examples",
        "--references",
        str(references),
        "--model",
        str(model),
    ]
    assert main([*argv, "--fusion-weight", "1", "--no-progress"]) == 2
    assert "error: --fusion-weight 1: the model" in capsys.readouterr().err
    for flags in (
        ["--model", str(model), "--fusion-weight", "0"],
        ["--model", str(model), "--no-fusion"],
        [],
    ):
        assert main(["caption", *flags, photo]) == 0, flags
    assert main(["caption", "--fusion-weight", "0.5", photo]) == 0  # the shipped model has them


def test_the_api_refuses_a_fusion_weight_for_a_model_without_language_models(default_model_dir, tmp_path):
    """The Python API as the command line: ``Captioner(model, fusion_weight=0.5)`` for a model
    without fusion.json is a ValueError naming the option and the model, not captions made as
    if it had not been given (it had been dropped without a word); 0 and None are taken."""
    from edgecap import Captioner

    model = tmp_path / "model"
    without_optional_files(copy_model(default_model_dir, model), "fusion")
    with pytest.raises(ValueError) as raised:
        Captioner(model, fusion_weight=0.5)
    assert str(raised.value) == (
        f"fusion_weight 0.5: the model {model} has no everyday caption language models (fusion.json) "
        "to fuse; leave fusion_weight out, or train them with `python -m edgecap.training.language_model` "
        "and add them with its `install` command (`python -m edgecap.training.language_model install --help`)"
    )
    with pytest.raises(ValueError, match="^fusion_weight 2: the model"):
        Captioner(model, options=CaptionOptions(fusion_weight=2.0))
    for weight in (0.0, None):
        with Captioner(model, fusion_weight=weight) as captioner:
            assert captioner.caption("edgecap/assets/examples/chelsea.png").text
    # options set after the Captioner is made are checked the same way (a copy given other
    # options, as the benchmarks run them): refused, the Captioner's options left as they were
    with Captioner(model) as captioner:
        before = captioner.options
        with pytest.raises(ValueError, match="^fusion_weight 0.5: the model"):
            captioner.options = CaptionOptions(fusion_weight=0.5)
        with pytest.raises(ValueError, match="^beam_size must be between 1 and 10 "):
            captioner.options = CaptionOptions(beam_size=11)
        with pytest.raises(TypeError, match="^options must be a CaptionOptions, got dict$"):
            captioner.options = {"beam_size": 2}
        assert captioner.options is before
        captioner.options = CaptionOptions(beam_size=1)
        assert captioner.caption("edgecap/assets/examples/chelsea.png").text


def test_a_gated_fusion_without_class_probabilities_adds_nothing(tmp_path):
    """A backend that gives no class probabilities (the fake's encoder gives none): the gate
    cannot tell a photo typical of the training photos from one that is not, so a gated fusion
    adds nothing (each row's weight 0, no bias, no language-model work) and the captions are
    the plain search's (fusion_weight=0), while the same fusion without a gate still adds its
    weight (other captions)."""
    from edgecap.decoding import search
    from edgecap.decoding.fusion import Gate

    fusion = _fusion(tmp_path, weight=2.0)
    gate = Gate(np.zeros(4), -1.0, 1.0)
    gated = Fusion(fusion.everyday, fusion.in_domain, fusion.weight, fusion.info, gate)
    rows = np.array([0, 0, 1], np.int32)
    scorer = gated.scorer(2.0, rows, class_probs=None)
    np.testing.assert_array_equal(scorer.weights[:, 0], [0.0, 0.0, 0.0])
    assert scorer.bias(0, np.full(3, START, np.int32), rows) is None
    np.testing.assert_array_equal(fusion.scorer(2.0, rows).weights[:, 0], [2.0, 2.0, 2.0])

    backend = PrefixHashBackend(vocab_size=V, top_k=8, end_bias=-1.0)
    encoded = backend.encode(np.arange(6))
    assert encoded.class_probs is None

    def captions(weight, model):
        options = CaptionOptions(beam_size=3, max_length=6, no_repeat_ngram=0, fusion_weight=weight)
        return [h[0].tokens for h in search(backend, encoded, options, START, END, V, fusion=model)]

    plain = captions(0.0, gated)
    assert captions(2.0, gated) == plain
    assert captions(2.0, fusion) != plain


@pytest.mark.parametrize(
    "gate",
    [
        '{"class_log_prior": [0.0, 0.0], "full_below": 0.5, "none_above": 0.5}',
        '{"class_log_prior": [0.0, 0.0], "full_below": 1.0, "none_above": -1.0}',
        '{"class_log_prior": [0.0, 1e999], "full_below": -1.0, "none_above": 1.0}',
        '{"class_log_prior": [0.0, NaN], "full_below": -1.0, "none_above": 1.0}',
    ],
    ids=["equal bounds", "bounds reversed", "infinite prior", "NaN prior"],
)
def test_a_gate_that_cannot_share_the_weight_is_a_model_error(tmp_path, gate):
    """The gate shares the weight linearly between full_below and none_above, dividing by
    their difference, from typicalities sum_c p(c) class_log_prior(c): equal bounds (a division
    by zero: each photo's share inf or NaN), bounds the wrong way round, or a prior with a
    number JSON reads as inf (1e999) or NaN (each photo's typicality then inf or NaN) make the
    fusion file malformed, refused where it is loaded in one ModelError, not a search on NaN
    weights."""
    _fusion(tmp_path)
    spec = json.loads((tmp_path / "fusion.json").read_text())
    text = json.dumps({**spec, "gate": "GATE"}).replace('"GATE"', gate)
    (tmp_path / "fusion.json").write_text(text)
    with pytest.raises(ModelError, match="malformed fusion file.*full_below < none_above"):
        Fusion.load(tmp_path, V, n_classes=2)


@pytest.mark.parametrize(("weight", "loads"), [(0.0, True), (2.0, True), (-0.5, False), (2.5, False)])
def test_a_fusion_file_takes_the_weights_the_fusion_weight_option_takes(tmp_path, weight, loads):
    """fusion.json's weight (the model's default for --fusion-weight) is any weight the option
    takes, 0 to 2 inclusive (--fusion-weight's range in edgecap caption --help): 0 (language
    models shipped but off unless asked for) and 2 load; below 0 or above 2 is a ModelError."""
    _fusion(tmp_path)
    spec = json.loads((tmp_path / "fusion.json").read_text())
    (tmp_path / "fusion.json").write_text(json.dumps({**spec, "weight": weight}))
    if loads:
        assert Fusion.load(tmp_path, V).weight == weight
    else:
        with pytest.raises(ModelError, match="weight must be in"):
            Fusion.load(tmp_path, V)


def test_a_gate_fitted_with_classes_no_training_photo_shows_is_written_and_read_back_as_fitted(tmp_path):
    """Gate.fit on training photos of which none shows classes 2 and 3 (their mean probability
    exactly 0, as float32 class probabilities that underflow give): their prior is
    log(4 x 0 + 1e-9) = -20.72, finite, so the gate goes into fusion.json and loads again; the
    loaded gate gives the fitted shares (to_json's 5 decimals: the prior within 5e-6, a share
    within 5e-6 x 1 / (the bounds' 0.049 apart) = 1e-4). By hand: q = [0.3, 0.7, 0, 0],
    prior log([1.2, 2.8, 1e-9, 1e-9]) = [0.1823, 1.0296, -20.72, -20.72]; the 200 training
    photos' typicalities x 0.1823 + (1 - x) 1.0296 are distinct (0.0025 apart), so the 5th
    percentile leaves 10 of them the full weight, the 15th 170 none, 20 a share; a photo of
    class 3 alone (typicality -20.72) gets the full weight."""
    from edgecap.decoding.fusion import Gate

    x = np.linspace(0.01, 0.59, 200)
    train = np.stack([x, 1 - x, np.zeros(200), np.zeros(200)], axis=1)
    fitted = Gate.fit(train)
    np.testing.assert_allclose(fitted.class_log_prior, [0.18232, 1.02962, -20.72327, -20.72327], atol=1e-5)
    _fusion(tmp_path)
    spec = json.loads((tmp_path / "fusion.json").read_text())
    (tmp_path / "fusion.json").write_text(json.dumps({**spec, "gate": fitted.to_json()}))
    loaded = Fusion.load(tmp_path, V, n_classes=4).gate
    shares = loaded(train)
    assert (shares == 1.0).sum() == 10 and (shares == 0.0).sum() == 170
    np.testing.assert_allclose(shares, fitted(train), atol=2e-4)
    assert loaded(np.array([[0.0, 0.0, 0.0, 1.0]]))[0] == 1.0


@pytest.mark.parametrize("earlier", ["fusion at 0.7", "no fusion"])
def test_installing_language_models_keeps_the_weight_the_confidence_was_fitted_at(
    earlier, default_model_dir, tmp_path
):
    """The shipped confidence.json names no fusion weight: it was fitted at the model's own,
    0.7 (fusion.json). Installing language models of weight 1.5 writes that earlier weight
    into it (0 where the model had no language models), so that captions at 1.5, a weight it
    never saw, are not rated as if it had (docs/confidence.md); at the earlier weight they are."""
    from edgecap import Captioner
    from edgecap.manifest import file_sha256
    from edgecap.training.language_model import install

    model = tmp_path / "model"
    copy_model(default_model_dir, model)
    if earlier == "no fusion":
        without_optional_files(model, "fusion")
    assert "fusion_weight" not in json.loads((model / "confidence.json").read_text())
    vocab_size = json.loads((model / "manifest.json").read_text())["dims"]["vocab_size"]
    for role, seed in (("everyday", 3), ("in_domain", 4)):
        _random_lm(tmp_path / f"{role}.npz", vocab_size, file_sha256(model / "vocab.json"), seed=seed)
    install(model, tmp_path / "everyday.npz", tmp_path / "in_domain.npz", 1.5)
    fitted = 0.7 if earlier == "fusion at 0.7" else 0.0
    assert json.loads((model / "confidence.json").read_text())["fusion_weight"] == fitted
    photo = "edgecap/assets/examples/chelsea.png"
    assert Captioner(model).caption(photo).confidence is None  # at its new own weight, 1.5
    assert Captioner(model, fusion_weight=fitted).caption(photo).confidence is not None


def test_the_search_gates_each_photo_by_its_own_class_probabilities(tmp_path):
    """A gated fusion through ``search`` (what the Captioner calls), weight 2: the gate's prior
    log(C q) = (1, -1, 0, 0), full weight below typicality -0.5, none above 0.5. The even
    photos' class probabilities are all on class 1 (typicality -1: share 1.5, clipped to 1),
    the odd photos' on class 0 (typicality 1: share -0.5, clipped to 0): the even photos get
    the captions of the ungated fusion at weight 2, the odd ones the plain search's."""
    from edgecap.decoding import search
    from edgecap.decoding.fusion import Gate

    fusion = _fusion(tmp_path, weight=2.0)
    gated = Fusion(
        fusion.everyday, fusion.in_domain, 2.0, fusion.info, Gate(np.array([1.0, -1, 0, 0]), -0.5, 0.5)
    )
    backend = PrefixHashBackend(vocab_size=V, top_k=8, end_bias=-1.0)
    encoded = backend.encode(np.arange(6))
    encoded.class_probs = np.array([[0.0, 1, 0, 0], [1.0, 0, 0, 0]] * 3, np.float32)
    options = CaptionOptions(beam_size=3, max_length=6, no_repeat_ngram=0)

    def by_loop(weight):  # the loop given the ungated fusion's scorer directly
        scorers = [partial(fusion.scorer, weight)] if weight else []
        found = beam_search(
            backend,
            backend.encode(np.arange(6)),
            options,
            START,
            END,
            filters=[NeverFirst([END])],
            scorers=scorers,
        )
        return [h[0].tokens for h in found]

    plain, fused = by_loop(0.0), by_loop(2.0)
    assert plain[0::2] != fused[0::2] and plain[1::2] != fused[1::2]
    found = [h[0].tokens for h in search(backend, encoded, options, START, END, V, fusion=gated)]
    assert found[0::2] == fused[0::2]
    assert found[1::2] == plain[1::2]


def test_the_trainers_help_names_the_install_command():
    """The caption error for a model without language models sends the user to
    ``python -m edgecap.training.language_model``; its --help had never said that its
    ``install`` command is what puts trained models into a model directory."""
    from edgecap.training.language_model import build_parser

    text = build_parser().format_help()
    assert "python -m edgecap.training.language_model install --model DIR" in text
