"""Growing a model's vocabulary by word transfer (export/transfer_words.py,
edgecap.training.grow.transfer_decoder): a new word is a copy of a known word of the same kind,
said where the photo's tag names it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("transfer_words", ROOT / "export" / "transfer_words.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def _steps(decoder, fmap, tokens):
    """Logits (T, N, V) and the states after each of a teacher-forced word sequence."""
    with torch.no_grad():
        features, att_proj, h, c = decoder.init_state(fmap)
        logits, states = [], []
        for t in tokens:
            out, h, c, _ = decoder.logits(t.expand(len(fmap)), h, c, features, att_proj)
            logits.append(out)
            states.append(h)
        return torch.stack(logits), torch.stack(states)


def test_a_transferred_word_is_its_source_word_shifted_by_delta():
    from edgecap.models.decoder import CaptionDecoder, DecoderConfig
    from edgecap.training.grow import transfer_decoder

    torch.manual_seed(0)
    old = CaptionDecoder(
        DecoderConfig(vocab_size=30, hidden_dim=32, feature_dim=32, embed_dim=16, attention_dim=16)
    ).eval()
    with torch.no_grad():
        old.out_vocab.bias.normal_(0, 1)
    sources = [7, 12, 7]  # two new words may share a source
    grown = transfer_decoder(old, sources, -1.5).eval()
    assert grown.cfg.vocab_size == 33
    fmap = torch.randn(2, 49, 1280)
    tokens = torch.tensor([1, 7, 12, 29, 5])
    old_logits, old_h = _steps(old, fmap, tokens)
    new_logits, new_h = _steps(grown, fmap, tokens)
    # every old word's logit as before; each new word's is its source's minus 1.5
    torch.testing.assert_close(new_logits[..., :30], old_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_logits[..., 30:], old_logits[..., sources] - 1.5, rtol=0, atol=1e-5)
    # the caption goes on after a new word as after its source (30 is a copy of 7, 31 of 12)
    _, via_new = _steps(grown, fmap, torch.tensor([1, 30, 31, 29, 5]))
    torch.testing.assert_close(via_new, new_h, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="source ids"):
        transfer_decoder(old, [30], -1.0)


def _table(tmp_path, text):
    path = tmp_path / "words.tsv"
    path.write_text(text, "utf-8")
    return path


def test_the_table_is_checked_row_by_row(tmp_path):
    from edgecap.vocab import Vocabulary

    module = _script()
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat"])
    rows = module.read_table(_table(tmp_path, "# comment\nwolf\tdog\t3,4\nkitten\tcat\n"), vocab, 10)
    assert [(r.word, r.source, r.classes) for r in rows] == [("wolf", "dog", (3, 4)), ("kitten", "cat", ())]
    for text, message in (
        ("cat\tdog\t1\n", ":1: 'cat' is already a word"),
        ("wolf\tdog\t1\nwolf\tcat\t2\n", ":2: 'wolf' is already a word"),
        ("wolf\tfox\t1\n", ":1: source 'fox' is not a word"),
        ("wolf\t<end>\t1\n", ":1: source '<end>' is not a word"),
        ("wolf\tdog\t10\n", ":1: class indices must be in 0..9"),
        ("wolf\tdog\tx\n", ":1: class indices must be integers"),
        ("wolf dog 1\n", ":1: expected NEW<TAB>SOURCE<TAB>CLASSES"),
        ("fire hydrant\tdog\t1\n", ":1: 'fire hydrant' is not one lower-case caption word"),
        ("Wolf\tdog\t1\n", ":1: 'Wolf' is not one lower-case caption word"),
        ("# nothing\n", "no word to transfer"),
    ):
        with pytest.raises(module.Problem, match=message):
            module.read_table(_table(tmp_path, text), vocab, 10)
    (tmp_path / "latin1.tsv").write_bytes("caf\xe9\tcat\n".encode("latin-1"))
    with pytest.raises(module.Problem, match="latin1.tsv: not UTF-8"):
        module.read_table(tmp_path / "latin1.tsv", vocab, 10)


def test_a_new_word_replaces_its_source_among_its_classes_words():
    module = _script()
    rows = [
        module.Transfer("zebra", "horse", (1,)),
        module.Transfer("zebras", "horses", (1,)),
        module.Transfer("sink", "toilet", (0, 2)),
    ]
    classes = {
        "about": "x.",
        "classes": [
            {"name": "washbasin", "words": ["bathroom"]},
            {"name": "zebra", "words": ["horse"]},
            {"name": "sink", "words": []},
            {"name": "sorrel", "words": ["horse"]},
        ],
    }
    grown = module.grown_classes(classes, rows)
    assert [e["words"] for e in grown["classes"]] == [
        ["sink", "bathroom"],
        ["zebra", "zebras"],  # the source left out: else its bonus would keep it ahead
        ["sink"],
        ["horse"],  # a class the table does not name is unchanged
    ]
    assert "zebra <- horse" in grown["about"]
    assert classes["classes"][1]["words"] == ["horse"]  # the input is not modified


def test_a_transferred_model_directory(tiny_model_dir, tmp_path, example_images):
    """On a real (tiny) export: the vocabulary grows after the old words, classes.json names the
    new word, the manifest's checksums hold, the language models' rows are copies, and with a
    delta that keeps the new words out the captions are the old model's."""
    from edgecap import Captioner
    from edgecap.manifest import file_sha256, load_manifest, verify_files
    from edgecap.vocab import Vocabulary

    module = _script()
    model = tmp_path / "model"
    model.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    old_vocab = Vocabulary.load(model / "vocab.json")
    V = len(old_vocab)
    rng = np.random.default_rng(0)

    def lm():
        return {
            "embed": rng.normal(size=(V, 8)),
            "w_ih": rng.normal(size=(32, 8)),
            "w_hh": rng.normal(size=(32, 8)),
            "bias": rng.normal(size=32),
            "out_w": rng.normal(size=(V, 8)),
            "out_b": rng.normal(size=V),
        }

    lms = {"everyday": lm(), "in_domain": lm()}
    spec = {"format": "edgecap-fusion/1", "weight": 0.5, "method": "density ratio"}
    for role, arrays in lms.items():
        np.savez(model / f"lm_{role}.npz", **{k: v.astype(np.float16) for k, v in arrays.items()})
        spec[role] = {"file": f"lm_{role}.npz", "sha256": file_sha256(model / f"lm_{role}.npz")}
    (model / "fusion.json").write_text(json.dumps(spec))
    table = _table(tmp_path, "puppy\tdog\t207\npuppies\tdogs\t207,208\n")

    out = module.transfer(model, table, tmp_path / "grown", -50.0, None)
    manifest = load_manifest(out)
    verify_files(manifest)
    vocab = Vocabulary.load(out / "vocab.json")
    assert vocab.words == old_vocab.words + ["puppy", "puppies"]
    assert manifest.dims.vocab_size == V + 2
    assert manifest.info["transferred_words"]["words"] == {"puppy": "dog", "puppies": "dogs"}
    # the exported decoder's new rows: its source's embedding and output rows, its bias - 50
    from edgecap.backends.torch import TorchBackend

    _, before = TorchBackend._build(load_manifest(model))
    _, after = TorchBackend._build(manifest)
    src = [old_vocab.index["dog"], old_vocab.index["dogs"]]
    for key, shift in (("embed.weight", 0.0), ("out_vocab.weight", 0.0), ("out_vocab.bias", -50.0)):
        old_rows, new_rows = before.state_dict()[key], after.state_dict()[key]
        torch.testing.assert_close(new_rows[:V], old_rows, rtol=0, atol=0)
        torch.testing.assert_close(new_rows[V:], old_rows[src] + shift, rtol=0, atol=1e-5)
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert classes[207]["words"][:2] == ["puppy", "puppies"] and classes[208]["words"][0] == "puppies"
    fusion = json.loads((out / "fusion.json").read_text())
    for role, arrays in lms.items():
        with np.load(out / fusion[role]["file"]) as grown:
            for key in ("embed", "out_w", "out_b"):
                np.testing.assert_array_equal(grown[key][:V], arrays[key].astype(np.float16))
                np.testing.assert_array_equal(grown[key][V:], arrays[key][src].astype(np.float16))
            np.testing.assert_array_equal(grown["w_hh"], arrays["w_hh"].astype(np.float16))

    def captions(directory):
        captioner = Captioner(directory, guidance_bonus=0, fusion_weight=0, consensus=False)
        return [c.text for c in captioner.caption_batch(example_images)]

    assert captions(out) == captions(model)


def test_a_used_output_folder_is_refused_and_a_failed_one_removed(tmp_path, monkeypatch):
    module = _script()
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep me")
    with pytest.raises(module.Problem, match="exists and is not an empty folder"):
        module.transfer(tmp_path / "model", tmp_path / "words.tsv", used, -1.0, None)
    assert (used / "mine.txt").read_text() == "keep me"
    # a missing model directory: one line and exit 2, no traceback
    missing = ["--model", str(tmp_path / "none"), "--words", "w.tsv", "--out", str(tmp_path / "o")]
    assert module.main(missing) == 2 and not (tmp_path / "o").exists()

    def half_done(model, table, out, delta, everyday):
        out.mkdir()
        (out / "decoder_step.onnx").write_bytes(b"half")
        raise SystemExit("everyday.npz: trained on another vocabulary")

    monkeypatch.setattr(module, "_transfer", half_done)
    with pytest.raises(SystemExit, match="another vocabulary"):
        module.transfer(tmp_path / "model", tmp_path / "words.tsv", tmp_path / "new", -1.0, None)
    assert not (tmp_path / "new").exists()  # no half-made model directory left behind

    def half_done_in(model, table, out, delta, everyday):
        (out / "decoder_step.onnx").write_bytes(b"half")
        (out / "sub").mkdir()
        raise SystemExit("table: a typo")

    monkeypatch.setattr(module, "_transfer", half_done_in)
    mine = tmp_path / "mine"
    mine.mkdir()  # the user's own empty folder: emptied again, not deleted
    with pytest.raises(SystemExit, match="a typo"):
        module.transfer(tmp_path / "model", tmp_path / "words.tsv", mine, -1.0, None)
    assert mine.is_dir() and not any(mine.iterdir())


def test_an_everyday_model_is_checked_before_anything_is_written(tmp_path, capsys):
    from edgecap.vocab import Vocabulary

    module = _script()
    grown = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "wolf"])
    lm = tmp_path / "everyday.npz"

    def lm_of(words):
        return {
            "embed": np.ones((words, 2)),
            "w_ih": np.ones((8, 2)),
            "w_hh": np.ones((8, 2)),
            "bias": np.ones(8),
            "out_w": np.ones((words, 2)),
            "out_b": np.ones(words),
        }

    np.savez(lm, **lm_of(7))
    with pytest.raises(module.Problem, match="everyday.npz: no everyday.json beside it"):
        module.everyday_lm(lm, grown)
    sidecar = tmp_path / "everyday.json"
    sidecar.write_text("{}")
    with pytest.raises(module.Problem, match="no training history"):
        module.everyday_lm(lm, grown)
    grown.save(tmp_path / "vocab.json")
    meta = {"vocab_sha256": "0" * 64, "history": [{"epoch": 1, "dev_perplexity": 30.0}]}
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(module.Problem, match="trained on another vocabulary"):
        module.everyday_lm(lm, grown)
    from edgecap.manifest import file_sha256

    sidecar.write_text(json.dumps({**meta, "vocab_sha256": file_sha256(tmp_path / "vocab.json")}))
    arrays, got = module.everyday_lm(lm, grown)
    assert arrays["embed"].shape == (7, 2) and got["history"][0]["dev_perplexity"] == 30.0
    np.savez(lm, **lm_of(6))  # trained before the growth, with a sidecar that says otherwise
    with pytest.raises(module.Problem, match="6 words, but the grown vocabulary has 7"):
        module.everyday_lm(lm, grown)
    np.savez(lm, **{**lm_of(7), "w_hh": np.ones((8, 3))})
    with pytest.raises(module.Problem, match="not a caption language model's arrays"):
        module.everyday_lm(lm, grown)
    lm.write_bytes(lm.read_bytes()[:100])  # truncated
    with pytest.raises(module.Problem, match="not a caption language model's arrays"):
        module.everyday_lm(lm, grown)
    args = ["--model", str(tmp_path), "--words", "w.tsv", "--out", str(tmp_path / "o"), "--delta", "nan"]
    assert module.main(args) == 2
    assert capsys.readouterr().err == "transfer_words: --delta must be a finite number, got nan\n"
