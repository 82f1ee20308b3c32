"""The main job's parts on tiny real models: the embedded task, its scorer, the ONNX cache, the picture."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import lifecycle  # noqa: E402
import smollm2  # noqa: E402
import tasks  # noqa: E402

torch = pytest.importorskip("torch")


# -- the embedded task -------------------------------------------------------------------------------
def test_word_group_task_is_fixed_balanced_and_disjoint():
    train, held = tasks.word_group_task()
    assert (train, held) == tasks.word_group_task()                  # same seed, same items, same order
    assert tasks.word_group_task(seed=1) != (train, held)
    assert (len(train), len(held)) == (128, 64)
    for label in tasks.WORD_GROUPS:
        assert sum(it.answer == label for it in held) == 16
        assert sum(it.answer == label for it in train) == 32
    train_prompts, held_prompts = {it.prompt for it in train}, {it.prompt for it in held}
    assert len(train_prompts) == 128 and len(held_prompts) == 64
    assert not train_prompts & held_prompts                           # no held-out word is trained on
    words = [w for ws in tasks.WORD_GROUPS.values() for w in ws]
    assert len(words) == len(set(words))                              # a word is in one group only
    assert all(it.labels == ("north", "south", "east", "west") for it in train + held)
    with pytest.raises(ValueError):
        tasks.word_group_task(held_out_per_group=48)


def test_the_rule_is_the_group_of_the_word():
    train, held = tasks.word_group_task()
    for it in train + held:
        word = it.prompt[len("Group of "):it.prompt.index(" (")]
        assert word in tasks.WORD_GROUPS[it.answer]


@pytest.fixture(scope="module")
def tokenizer():
    """A real word-level fast tokenizer over the task's vocabulary (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = {w for ws in tasks.WORD_GROUPS.values() for w in ws} | {"Group", "of", "(north,", "south,", "east",
                                                                     "or", "west):"}
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "north": 3, "south": 4, "east": 5, "west": 6,
             **{w: i + 7 for i, w in enumerate(sorted(words - {"east"}))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_encode_choice_trains_on_the_answer_token_only(tokenizer):
    item = tasks.ChoiceItem("Group of tiger (north, south, east or west):", "north", ("north", "south"))
    enc = tasks.encode_choice(tokenizer, item)
    assert enc["input_ids"][-1] == enc["labels"][-1] == tokenizer.convert_tokens_to_ids("north")
    assert set(enc["labels"][:-1]) == {tasks.IGNORE_INDEX} and len(enc["labels"]) == len(enc["input_ids"])
    with pytest.raises(ValueError, match="not 1"):
        tasks.label_token_ids(tokenizer, ["north west"])


def _tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=0)).eval()


def test_length_grouped_scoring_equals_one_item_at_a_time(tokenizer):
    """Batches of equal-length prompts (no padding, no mask) score exactly as single prompts do."""
    model = _tiny_llama(len(tokenizer))
    items = tasks.word_group_task()[1][:12] + [tasks.ChoiceItem("Group of", "west", ("north", "south", "east",
                                                                                    "west"))]
    preds = tasks.choice_predictions(tasks.torch_last_logits(model), tokenizer, items)
    choices = tasks.label_token_ids(tokenizer, ("north", "south", "east", "west"))
    for it, pred in zip(items, preds):
        ids = tokenizer(it.prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            last = model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert pred == it.labels[int(last[choices].argmax())]
    assert tasks.choice_accuracy(preds, items) == sum(p == it.answer for p, it in zip(preds, items)) / len(items)


def test_smollm2_labels_are_single_tokens():
    if not smollm2._is_complete(smollm2.default_cache_dir()):
        pytest.skip("no SmolLM2 cache yet (python examples/smollm2.py makes it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.default_cache_dir())
    assert len(set(tasks.label_token_ids(tok, tuple(tasks.WORD_GROUPS)))) == 4


def test_batches_repeat_the_same_plan_and_cover_every_item():
    plan = lifecycle.batches(10, 4, 5, seed=0)
    assert plan == lifecycle.batches(10, 4, 5, seed=0) and len(plan) == 5
    flat = [i for b in plan for i in b]
    assert sorted(flat[:10]) == list(range(10))                      # the first epoch is a permutation
    assert all(len(b) == 4 for b in plan)


# -- the ONNX cache ----------------------------------------------------------------------------------
@pytest.fixture()
def checkpoint(tmp_path):
    model = _tiny_llama(64)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_onnx_export_is_cached_under_its_key(tmp_path, checkpoint, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    root = tmp_path / "cache"
    assert smollm2.cached_onnx(checkpoint, root) is None
    path = smollm2.ensure_onnx(checkpoint, root, verbose=False)
    assert smollm2.cached_onnx(checkpoint, root) == path
    key, record = smollm2.export_key(checkpoint)
    assert path == root / "onnx" / key[:24] / smollm2.ONNX_FILE
    assert path.with_name(path.name + ".data").is_file()
    assert json.loads((path.parent / "export.json").read_text()) == record
    assert record["versions"]["onnx"] and record["settings"] == smollm2.EXPORT_SETTINGS
    assert sorted(os.listdir(root / "onnx")) == [key[:24]]           # no temporary folder left behind

    # the cached model is the checkpoint's: same logits, any batch and length
    from transformers import AutoModelForCausalLM

    ids = np.array([[5, 9, 3, 7, 1], [2, 2, 8, 6, 4], [1, 3, 5, 7, 9]], dtype=np.int64)
    want = AutoModelForCausalLM.from_pretrained(checkpoint).eval()(input_ids=torch.from_numpy(ids)).logits
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-5)

    # a second call finds it and exports nothing
    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(smollm2, "export_onnx", no_export)
    assert smollm2.ensure_onnx(checkpoint, root, verbose=False) == path


def test_onnx_key_follows_weights_versions_and_settings(checkpoint, monkeypatch):
    key, _ = smollm2.export_key(checkpoint)
    assert smollm2.export_key(checkpoint)[0] == key
    monkeypatch.setitem(smollm2.EXPORT_SETTINGS, "dtype", "float16")
    assert smollm2.export_key(checkpoint)[0] != key
    monkeypatch.undo()
    import importlib.metadata as md

    real_version = md.version
    monkeypatch.setattr(md, "version", lambda name: "0.0" if name == "onnxscript" else real_version(name))
    assert smollm2.export_key(checkpoint)[0] != key
    monkeypatch.undo()
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                                                        # one bit of one weight
    weights.write_bytes(bytes(data))
    assert smollm2.export_key(checkpoint)[0] != key
    with pytest.raises(FileNotFoundError):
        smollm2.export_key(checkpoint.parent)


def test_an_interrupted_export_leaves_nothing(tmp_path, checkpoint, monkeypatch):
    def half_export(model, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "export_onnx", half_export)
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        smollm2.ensure_onnx(checkpoint, root, verbose=False)
    assert os.listdir(root / "onnx") == []


# -- the picture and the table -----------------------------------------------------------------------
def test_write_plot_makes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    path = lifecycle.write_plot(tmp_path / "out" / "run.png",
                                {"NeuroAda k=20": [3.0, 1.0, 0.2], "LoRA r=8": [3.1, 1.5, 0.4]},
                                {"untuned": 0.25, "NeuroAda k=20": 0.95, "LoRA r=8": 0.9},
                                {"NeuroAda adapter": 12_000_000, "LoRA adapter": 9_800_000,
                                 "merged checkpoint": 538_000_000}, "title")
    assert path == tmp_path / "out" / "run.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = image.imread(path).shape
    assert 200 < h < 600 and 600 < w < 1400                             # small, wide: three panels
    assert os.listdir(path.parent) == ["run.png"]                       # no temporary file left


def test_table_lines_up_and_leaves_blank_what_does_not_apply():
    rows = [lifecycle.Result("untuned", 0.25),
            lifecycle.Result("NeuroAda k=20 (runtime)", 0.969, 3_110_400, "adapter 12.5 MB", 12_532_024, 41.2,
                             2100.0),
            lifecycle.Result("merged ONNX (onnxruntime)", 0.969, check="max rel diff 2.0e-06")]
    lines = lifecycle.table(rows)
    assert len(lines) == 4 and "held-out acc" in lines[0] and "train +RSS" in lines[0]
    assert "25.0%" in lines[1] and "3,110,400" in lines[2] and "41 s" in lines[2] and "2,100 MB" in lines[2]
    assert lines[3].endswith("max rel diff 2.0e-06")
    assert len({line.index("%") for line in lines[1:]}) == 1            # accuracies in one column


def test_peak_rss_sees_an_allocation_after_a_reset():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    before = lifecycle.reset_peak_rss()
    block = np.ones(64 * 2**20 // 8)                                      # 64 MB, touched
    peak = lifecycle.peak_rss_mb()
    del block
    assert peak - before >= 60
    assert lifecycle.reset_peak_rss() < peak and lifecycle.peak_rss_mb() < peak   # the counter restarted
    assert max(lifecycle._FOLDED) >= peak - 2                           # and the old peak is kept (the
    # kernel's RSS counters are per-thread caches, exact to a few pages only)


# -- the GGUF output: trained through the Q4_1 grid -----------------------------------------------------
def test_grid_trained_adapter_keeps_all_of_its_change_in_the_q4_1_gguf(tmp_path, tokenizer):
    """The main job's GGUF stage on a tiny Llama written to a Q4_1 file: trained (lifecycle.train) through
    the file's grid, merged with neuroada-merge and read back by lifecycle.gguf_check, it keeps 100% of the
    adapter's logit change, exactly."""
    pytest.importorskip("gguf")
    sys.path.insert(0, str(ROOT / "tests" / "converters"))
    from test_gguf import write_gguf  # the tiny GGUF generator (llama.cpp's layout: q/k rows permuted)

    from neuroada_format.converters import gguf_names
    from neuroada_format.converters.merge_cli import run as merge_run
    from neuroada_format.runtime import NeuroAdaConfig, attach, load_adapter, merge, save_adapter, train_on_grid

    source = _tiny_llama(len(tokenizer))
    path = write_gguf(tmp_path / "base.gguf", {k: v.numpy() for k, v in source.state_dict().items()})
    view = gguf_names.open_gguf_base(path)

    def dequantized():
        model = _tiny_llama(len(tokenizer))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(view.array(name), dtype=np.float32)))
        return model

    train_set, held_out = tasks.word_group_task()
    encoded = [tasks.encode_choice(tokenizer, it) for it in train_set]
    enc = tokenizer([it.prompt for it in held_out[:4]], return_tensors="pt", padding=True, add_special_tokens=False)
    plain = dequantized()
    with torch.no_grad():
        untuned = plain(**enc).logits.float().numpy()

    model = attach(dequantized(), NeuroAdaConfig(k=4, target_modules=lifecycle.PROJECTIONS))
    types = train_on_grid(model, path)
    assert set(types.values()) == {"Q4_1"} and len(types) == 14
    lifecycle.train(model, tokenizer, encoded, lifecycle.batches(len(encoded), 8, 4, 0), lr=3e-2, desc="grid")
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)
    served = load_adapter(dequantized(), adapter)  # the reference is the saved file, merged (as in the job)
    merge(served)
    with torch.no_grad():
        ref = served(**enc).logits.float().numpy()
    assert np.abs(ref - untuned).max() > 1e-3                             # the adapter changed the model
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", str(path), "--adapter", str(adapter), "--out", str(out)]) == 0
    acc, retention, worst = lifecycle.gguf_check(plain, out, enc, tokenizer, held_out, ref, untuned)
    assert retention == 1.0 and worst == 0.0
    assert out.stat().st_size == path.stat().st_size
