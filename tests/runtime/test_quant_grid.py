"""Training through a GGUF file's quantization grid (runtime/quant_grid.py): the adapter merges into the
4-bit file exactly.

A tiny Llama is written to a Q4_1 / Q8_0 GGUF the way llama.cpp's converter writes it (test_gguf's
generator: q/k rows permuted for rope), loaded with transformers' own GGUF loader (the model holds the
file's de-quantized weights), trained a few steps through the grid with a plain loop or
transformers.Trainer, saved, and merged back into the file with `neuroada-merge`. The merged file, read
back, must equal the runtime's merge bit for bit, with every block that holds no changed value
byte-identical. F16 and BF16 tensors are snapped to their dtype (the merge rounds w0 + delta to it), so they
decode to the runtime's merge too.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "converters"))
from test_gguf import hf_arrays, write_gguf  # noqa: E402  (the tiny GGUF generator)

import neuroada_format as naf  # noqa: E402
from neuroada_format import NeuroAdaError, NeuroAdaUsageError  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.converters import gguf_read as gr  # noqa: E402
from neuroada_format.converters.merge_cli import run as merge_run  # noqa: E402
from neuroada_format.runtime import (  # noqa: E402
    NeuroAdaConfig,
    adapter_batch,
    add_weighted_adapter,
    attach,
    grid_types,
    merge,
    merge_and_unload,
    remove_grid,
    save_adapter,
    set_adapter,
    train_on_grid,
    unmerge,
)
from neuroada_format.runtime.guards import CONFIGS_ATTR, layers # noqa: E402
from neuroada_format.runtime.quant_grid import FloatGrid  # noqa: E402

QT = gguf.GGMLQuantizationType
F16_TARGET = "model.layers.0.mlp.up_proj.weight"  # one projection stored as F16: snapped to F16 values
Q5_TARGET = "model.layers.1.self_attn.o_proj.weight"  # one as Q5_1, a block type without a grid here: plain
OTHER = {F16_TARGET: "F16", Q5_TARGET: "Q5_1"}       # the targets of another type than the file's main one
PLAIN = {Q5_TARGET}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{type name: GGUF path} for Q4_1, Q4_0 and Q8_0 files of the same weights (one F16 and one Q5_1
    projection each)."""
    tmp = tmp_path_factory.mktemp("grid")
    return {t.name: write_gguf(tmp / f"base-{t.name}.gguf", hf_arrays(), t,
                               types={F16_TARGET: QT.F16, Q5_TARGET: QT.Q5_1})
            for t in (QT.Q4_1, QT.Q4_0, QT.Q8_0)}


_MODELS: dict = {}


def load(path):
    """The GGUF's de-quantized weights, read by transformers' GGUF loader, in a plain model (as the main job's
    safetensors cache gives them; Trainer refuses a model that still carries the GGUF quantizer). Cached
    per file, deep-copied."""
    path = Path(path)
    if path not in _MODELS:
        read = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32)
        config = copy.deepcopy(read.config)
        del config.quantization_config
        plain = type(read)(config).eval()
        plain.load_state_dict(read.state_dict())
        _MODELS[path] = plain
    return copy.deepcopy(_MODELS[path])


def batch(seed=0):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def train(model, steps=6, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in range(steps):
        model(**batch(s % 2)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def attached(path, k=4):
    model = attach(load(path), NeuroAdaConfig(k=k))
    return model, train_on_grid(model, path)


def deltas(model):
    return {n: l.delta("default").detach().clone() for n, l in layers(model).items()}


def check_merged_file(base, merged_path, model):
    """The merged GGUF decodes to the runtime merge on every gridded target, bit for bit; blocks with no
    changed value are byte-identical; every touched block keeps its scale and minimum."""
    view, mv = gn.open_gguf_base(base), gn.open_gguf_base(merged_path)
    snapped = deltas(model)
    merge(model)
    try:
        gridded = grid_types(model)
        assert gridded
        for name, layer in layers(model).items():
            key = name + ".weight"
            if name in gridded:
                np.testing.assert_array_equal(mv.array(key), layer.weight.detach().numpy(), err_msg=key)
            if name not in gridded or gridded[name] in FloatGrid.DTYPES:
                continue
            mapped = view.resolve(key)
            src = np.asarray(view.file.blocks(mapped.gguf_name))
            dst = np.asarray(mv.file.blocks(mapped.gguf_name))
            block = gguf.GGML_QUANT_SIZES[view.file.tensors[mapped.gguf_name].type][0]
            idx = layer.neuroada_idx["default"].numpy()
            changed = snapped[name].numpy() != 0
            inverse = np.arange(layer.d_out) if mapped.inverse is None else mapped.inverse  # HF row -> GGUF row
            rows = np.broadcast_to(inverse[:, None], idx.shape)
            n_per_row = layer.d_in // block
            holds = np.zeros(src.shape[0], bool)
            holds[(rows * n_per_row + idx // block)[changed]] = True
            assert holds.any() and not holds.all()
            assert np.array_equal(src[~holds], dst[~holds]), key                  # byte-identical
            head = 4 if gridded[name] == "Q4_1" else 2
            assert np.array_equal(src[:, :head], dst[:, :head]), key              # scales (and minima) kept
            assert not np.array_equal(src[holds], dst[holds]), key                # the levels did change
    finally:
        unmerge(model)


def merged_json(base, adapter, out, capsys):
    """neuroada-merge BASE + ADAPTER -> OUT with --json: (the summary's details, what it printed)."""
    capsys.readouterr()
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(adapter), "--out", os.fspath(out),
                      "--json"]) == 0
    said = capsys.readouterr()
    return json.loads(said.out)["details"], said


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0", "Q8_0"])
def test_trained_on_grid_merges_into_the_gguf_exactly(bases, tmp_path, qtype, capsys):
    base = bases[qtype]
    model, types = attached(base)
    assert {k: types[k] for k in OTHER} == OTHER and {t for k, t in types.items() if k not in OTHER} == {qtype}
    assert set(grid_types(model)) == {k.removesuffix(".weight") for k in types if k not in PLAIN}
    train(model)
    snapped = deltas(model)
    assert sum(int((v != 0).sum()) for v in snapped.values()) > 100           # the deltas crossed grid steps
    for name, layer in layers(model).items():                                  # w0 + delta is on the grid
        if name in grid_types(model):
            grid = layer.neuroada_grid["default"]
            w = layer.neuroada_w0["default"] + snapped[name]
            assert torch.equal(grid.levels(w, layer.neuroada_idx["default"])[1], w), name
    model.save_pretrained(tmp_path / "out")                                    # what Trainer's save_model writes
    adapter = naf.load(tmp_path / "out" / "neuroada_model.safetensors")
    assert {str(t.values.dtype) for t in adapter.targets.values()} == {"float32"}
    for name, v in snapped.items():                                            # the file holds the snapped deltas
        np.testing.assert_array_equal(np.asarray(adapter.targets[name + ".weight"].values), v.numpy())
    out = tmp_path / "merged.gguf"
    details, said = merged_json(base, tmp_path / "out", out, capsys)
    # every gridded block packed on its grid; only the Q5_1 projection (no grid: re-encoded) is warned about
    q5 = gn.open_gguf_base(base).resolve(Q5_TARGET).gguf_name
    n_q5 = gr.read_gguf(base).tensors[q5].nbytes // gguf.GGML_QUANT_SIZES[QT.Q5_1][1]
    assert 0 < details["blocks_reencoded"] <= n_q5
    total = details["blocks_on_grid"] + details["blocks_reencoded"]
    assert said.err.count("warning:") == 1
    assert f"{details['blocks_reencoded']:,} of {total:,} touched blocks in 1 of " in said.err
    assert f"{q5}: Q5_1" in said.err
    assert out.stat().st_size == base.stat().st_size
    check_merged_file(base, out, model)
    # the F16 projection merged by the spec's rule (rounded to F16), as for any float tensor: the runtime's
    # merge (check_merged_file) because its deltas were snapped to F16 values
    assert grid_types(model)[F16_TARGET.removesuffix(".weight")] == "F16"
    view, mv = gn.open_gguf_base(base), gn.open_gguf_base(out)
    np.testing.assert_array_equal(mv.array(F16_TARGET),
                                  naf.merge_weight(view.array(F16_TARGET), [adapter.targets[F16_TARGET]]))


def test_forward_is_the_snapped_model_and_gradients_pass_straight_through(bases):
    base = bases["Q4_1"]
    model, _ = attached(base)
    layer = next(l for n, l in layers(model).items() if n in grid_types(model))
    val = layer.neuroada_val["default"]
    with torch.no_grad():  # latent deltas a third of a step: the snapped ones are all zero
        d = layer.neuroada_grid["default"]._at(layer.neuroada_idx["default"])[0]
        val.copy_(d / 3)
    assert not layer.delta("default").any()
    x = torch.randn(3, layer.d_in)
    plain = layer.base_layer(x)
    y = layer(x)
    assert torch.equal(y, plain)                                # the forward sees the snapped (zero) deltas
    y.square().sum().backward()
    assert val.grad is not None and val.grad.abs().sum() > 0   # ... and the gradient still reaches val
    # the gradient is the one of the snapped point (straight through): the plain layer's at the same deltas
    ref = copy.deepcopy(layer)
    remove_grid_layer = ref._modules.pop("neuroada_grid")
    assert remove_grid_layer is not None
    with torch.no_grad():
        ref.neuroada_val["default"].zero_()
    ref.neuroada_val["default"].grad = None
    ref(x).square().sum().backward()
    torch.testing.assert_close(val.grad, ref.neuroada_val["default"].grad)

    train(model, steps=4)
    y_train = model(input_ids=batch()["input_ids"]).logits
    merge(model)
    y_merged = model(input_ids=batch()["input_ids"]).logits
    unmerge(model)
    assert torch.equal(y_train, y_merged)                       # training forward == the merged model


def run_trainer(model, out_dir, resume=None):
    data = [batch(i) for i in range(4)]
    data = [{"input_ids": d["input_ids"][j], "labels": d["labels"][j]} for d in data for j in range(2)]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="steps", save_steps=2, logging_strategy="no", use_cpu=True, seed=0,
        data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DS())
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == 4
    return trainer


def test_trainer_path(bases, tmp_path):
    """transformers.Trainer unchanged: it trains through the grid, its save_model writes on-grid deltas, and
    a run resumed from a checkpoint (model rebuilt, grid registered again) ends where an unbroken one does."""
    base = bases["Q4_1"]
    model, _ = attached(base)
    trainer = run_trainer(model, tmp_path / "run")
    again, _ = attached(base)
    run_trainer(again, tmp_path / "resumed", resume=str(tmp_path / "run" / "checkpoint-2"))
    for (n, a), b in zip(layers(model).items(), layers(again).values()):
        assert torch.equal(a.neuroada_val["default"], b.neuroada_val["default"]), n   # the unsnapped state too
    trainer.save_model(str(tmp_path / "final"))
    snapped = deltas(model)
    assert sum(int((v != 0).sum()) for v in snapped.values()) > 0
    adapter = naf.load(tmp_path / "final" / "neuroada_model.safetensors")
    for name, v in snapped.items():
        np.testing.assert_array_equal(np.asarray(adapter.targets[name + ".weight"].values), v.numpy())
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(tmp_path / "final"),
                      "--out", os.fspath(out)]) == 0
    check_merged_file(base, out, model)


def test_wrong_base_is_refused_and_nothing_changes(bases, tmp_path):
    model = attach(load(bases["Q4_1"]), NeuroAdaConfig(k=4))
    train(model, steps=2)
    before = copy.deepcopy(model)
    other = write_gguf(tmp_path / "other.gguf", hf_arrays(seed=9), QT.Q4_1)
    with pytest.raises(NeuroAdaError, match="not this model's base") as exc:
        train_on_grid(model, other)
    assert exc.value.rule == "4.3" and not isinstance(exc.value, NeuroAdaUsageError)
    assert grid_types(model) == {} and getattr(model, CONFIGS_ATTR)["default"].save_dtype == "BF16"

    small = hf_arrays()  # another shape: a model with a wider MLP is not this file's model
    wider = {k: (np.concatenate([v, v], axis=0) if k.endswith("up_proj.weight") else v) for k, v in small.items()}
    with pytest.raises(NeuroAdaError, match="not this model's base") as exc:
        train_on_grid(model, write_gguf(tmp_path / "wider.gguf", wider, QT.Q4_1))
    assert exc.value.rule == "4.2"

    with pytest.raises(NeuroAdaUsageError):
        train_on_grid(model, tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, just bytes")
    with pytest.raises(NeuroAdaError):
        train_on_grid(model, tmp_path / "junk.gguf")
    with pytest.raises(NeuroAdaUsageError, match=r"no attached layer .* \(have: default; pass adapter_name=\)"):
        train_on_grid(model, bases["Q4_1"], adapter_name="other")  # the adapters there are named
    merge(model)
    with pytest.raises(NeuroAdaUsageError, match="merged"):
        train_on_grid(model, bases["Q4_1"])
    unmerge(model)
    bf = attach(load(bases["Q4_1"]), NeuroAdaConfig(k=2, delta_dtype="bfloat16"))
    with pytest.raises(NeuroAdaUsageError, match="float32"):
        train_on_grid(bf, bases["Q4_1"])
    x = batch()["input_ids"]
    assert torch.equal(model(input_ids=x).logits, before(input_ids=x).logits)


def test_remove_grid_restores_plain_behaviour(bases, tmp_path):
    base = bases["Q4_1"]
    model, _ = attached(base)
    cfg = getattr(model, CONFIGS_ATTR)["default"]
    assert cfg.save_dtype == "F32"
    train(model, steps=3)
    latent = {n: l.neuroada_val["default"].detach().clone() for n, l in layers(model).items()}
    snapped = deltas(model)
    assert any(not torch.equal(latent[n], snapped[n]) for n in latent)
    x = batch()["input_ids"]
    on_grid_logits = model(input_ids=x).logits

    plain = copy.deepcopy(model)
    remove_grid(plain)
    assert grid_types(plain) == {} and not any("neuroada_grid" in n for n, _ in plain.named_modules())
    assert getattr(plain, CONFIGS_ATTR)["default"].save_dtype == "BF16"
    for n, l in layers(plain).items():
        assert l.delta("default") is l.neuroada_val["default"]
        assert torch.equal(l.neuroada_val["default"], latent[n])
    fresh = attach(load(base), NeuroAdaConfig(k=4))   # the plain runtime with the same (latent) deltas
    with torch.no_grad():
        for n, l in layers(fresh).items():
            l.neuroada_val["default"].copy_(latent[n])
    assert torch.equal(plain(input_ids=x).logits, fresh(input_ids=x).logits)

    baked = copy.deepcopy(model)
    remove_grid(baked, snap=True)                      # the snapped values become the adapter's own
    assert grid_types(baked) == {} and getattr(baked, CONFIGS_ATTR)["default"].save_dtype == "F32"
    for n, l in layers(baked).items():
        assert torch.equal(l.neuroada_val["default"], snapped[n])
    assert torch.equal(baked(input_ids=x).logits, on_grid_logits)
    save_adapter(baked, tmp_path / "baked.safetensors")
    out = tmp_path / "merged.gguf"
    assert merge_run(["--base", os.fspath(base), "--adapter", os.fspath(tmp_path / "baked.safetensors"),
                      "--out", os.fspath(out)]) == 0
    train_on_grid(baked, base)  # on-grid deltas: the grid changes nothing, the merge is exact
    check_merged_file(base, out, baked)


def test_serving_paths_serve_the_snapped_deltas(bases):
    """set_adapter, a mixed batch and add_weighted_adapter serve what merge and the forward serve while a
    grid is on: the deltas snapped to it, not the latent ones."""
    model, _ = attached(bases["Q4_1"])
    train(model, steps=4)
    latent = {n: l.neuroada_val["default"].detach().clone() for n, l in layers(model).items()}
    snapped = deltas(model)
    assert any(not torch.equal(latent[n], snapped[n]) for n in latent)   # else this test shows nothing
    ids = batch()["input_ids"]
    with torch.no_grad():
        merge(model)
        want = model(input_ids=ids).logits
        unmerge(model)
        plain = copy.deepcopy(model)
        remove_grid(plain)
        latent_logits = plain(input_ids=ids).logits
        assert not torch.allclose(want, latent_logits, atol=1e-4)

        set_adapter(model, "default")  # trainable: active unmerged, the snapped deltas written around each GEMM
        assert torch.equal(model(input_ids=ids).logits, want)
        for l in layers(model).values():
            l.neuroada_val["default"].requires_grad_(False)
        set_adapter(model, "default")  # frozen (as loaded for inference): served merged
        assert all(l.merged_adapters == ["default"] for l in layers(model).values())
        assert torch.equal(model(input_ids=ids).logits, want)            # merged with the merge's bits
        set_adapter(model, None)
        with adapter_batch(model, ["default", None]):
            mixed = model(input_ids=ids).logits
        torch.testing.assert_close(mixed[0], want[0], atol=1e-5, rtol=1e-5)  # base(x) + S(x): not bit-equal
        set_adapter(model, None)
        with adapter_batch(model, ["default", "default"]):
            assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)

    add_weighted_adapter(model, ["default"], [1.0], "combined")
    for n, l in layers(model).items():
        order = torch.argsort(l.neuroada_idx["combined"], dim=1)
        got = torch.gather(l.neuroada_val["combined"].detach(), 1, order)
        assert torch.equal(torch.gather(l.neuroada_idx["combined"], 1, order), l.neuroada_idx["default"]), n
        assert torch.equal(got, snapped[n]), n


def test_grids_take_their_models_train_or_eval_mode(bases):
    """A grid module added to an eval() model was in training mode (a new module's default) under layers in eval."""
    model, _ = attached(bases["Q4_1"])
    assert not model.training and not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_copies_and_pickles_keep_the_grid(bases):
    model, _ = attached(bases["Q4_1"])
    train(model, steps=2)
    x = batch()["input_ids"]
    want = model(input_ids=x).logits
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert grid_types(other) == grid_types(model)
        assert torch.equal(other(input_ids=x).logits, want)
    state = model.state_dict()
    assert not any("neuroada_grid" in k for k in state)   # the grid is derived from the file, never saved
    half = copy.deepcopy(model).to(torch.float64).to(torch.float32)  # dtype moves leave the f16 grid exact
    assert torch.equal(half(input_ids=x).logits, want)


def test_runtime_imports_without_gguf():
    """The runtime never needs gguf until a grid is registered; then the refusal is ours."""
    code = ("import sys; sys.modules['gguf'] = None\n"
            "import neuroada_format.runtime as rt\n"
            "from neuroada_format import NeuroAdaUsageError\n"
            "import torch\n"
            "m = rt.attach(torch.nn.Sequential(torch.nn.Linear(8, 8)), rt.NeuroAdaConfig(k=2, target_modules=['0']))\n"
            "try:\n    rt.train_on_grid(m, 'x.gguf')\nexcept NeuroAdaUsageError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "gguf" in r.stdout


@pytest.mark.parametrize("ktype", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"])
def test_trained_on_kquant_grids_merges_exactly(tmp_path, ktype, capsys):
    """A K-quant projection (llama.cpp's Q4_K_M / Q5_K_M / Q3_K_M / Q2_K files): the grid is per sub-block of each
    super-block, and a delta trained through it merges into the file exactly, with the super-block's scales kept
    (gguf_kquants)."""
    from neuroada_format.converters import gguf_kquants as kq
    t = QT[ktype]
    arrays = hf_arrays()
    downs = [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]  # [64, 256]: one super-block per row
    raw = {n: kq.encode(t, arrays[n].reshape(-1, 256), None, None) for n in downs}
    base = write_gguf(tmp_path / "base.gguf", arrays, QT.Q8_0, types={n: t for n in downs}, raw=raw)
    model, types = attached(base)
    assert {types[n] for n in downs} == {ktype}
    assert {n + ".weight" for n in grid_types(model)} == set(types)                # every projection on a grid
    train(model)
    snapped = deltas(model)
    assert all(int((snapped[n.removesuffix(".weight")] != 0).sum()) > 10 for n in downs)
    model.save_pretrained(tmp_path / "out")
    out = tmp_path / "merged.gguf"
    details, said = merged_json(base, tmp_path / "out", out, capsys)
    assert details["blocks_reencoded"] == 0 and "warning:" not in said.err
    view, mv = gn.open_gguf_base(base), gn.open_gguf_base(out)
    merge(model)
    try:
        for name, layer in layers(model).items():
            np.testing.assert_array_equal(mv.array(name + ".weight"), layer.weight.detach().numpy(), err_msg=name)
    finally:
        unmerge(model)
    for n in downs:
        g = view.resolve(n).gguf_name
        a, b = kq.unpack(t, view.file.blocks(g)), kq.unpack(t, mv.file.blocks(g))
        assert np.array_equal(a.d, b.d) and np.array_equal(a.sc, b.sc) and np.array_equal(a.mn, b.mn)


@pytest.mark.parametrize("itype", ["IQ4_XS", "IQ4_NL"])
def test_iq4_layers_stay_plain(tmp_path, itype):
    """IQ4_XS / IQ4_NL levels are a non-uniform table, not a range of integers: no grid here, so train_on_grid leaves
    those layers plain (their merge re-encodes the touched blocks) and snaps the others."""
    from neuroada_format.converters import gguf_kquants as kq
    t = QT[itype]
    arrays = hf_arrays()
    downs = [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    raw = {n: kq.encode(t, arrays[n].reshape(-1, gguf.GGML_QUANT_SIZES[t][0]), None, None).reshape(64, -1)
           for n in downs}
    base = write_gguf(tmp_path / "base.gguf", arrays, QT.Q8_0, types={n: t for n in downs}, raw=raw)
    model, types = attached(base)
    assert {types[n] for n in downs} == {itype}
    assert {n + ".weight" for n in grid_types(model)} == set(types) - set(downs)


def test_float_tensors_are_snapped_to_their_dtype_and_merge_exactly(tmp_path, capsys):
    """F16 and BF16 projections of a Q4_1 file: the model holds their values in f32, the merge rounds
    w0 + delta to the tensor's dtype, so train_on_grid snaps those layers to it. The merged file, read by gguf
    and by transformers, is the runtime's merge_and_unload bit for bit (weights and logits) on every target:
    F16, BF16, Q4_1 (unchanged) and F32 (plain: nothing to round)."""
    f16, bf16, f32 = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                      "model.layers.1.self_attn.v_proj.weight")
    (tmp_path / "base").mkdir()
    base = write_gguf(tmp_path / "base" / "b.gguf", hf_arrays(), QT.Q4_1,
                      types={f16: QT.F16, bf16: QT.BF16, f32: QT.F32})
    model, types = attached(base)
    assert (types[f16], types[bf16], types[f32]) == ("F16", "BF16", "F32")
    gridded = {n + ".weight": t for n, t in grid_types(model).items()}
    assert gridded == {k: t for k, t in types.items() if k != f32}          # F32 alone stays plain
    train(model)
    ids = batch()["input_ids"]
    snapped, lay = deltas(model), layers(model)
    for key, dt in ((f16, torch.float16), (bf16, torch.bfloat16)):
        name = key.removesuffix(".weight")
        w = lay[name].neuroada_w0["default"] + snapped[name]
        assert torch.equal(w.to(dt).float(), w) and snapped[name].any(), key   # on the dtype's grid, and moved
        latent = lay[name].neuroada_w0["default"] + lay[name].neuroada_val["default"].detach()
        assert not torch.equal(latent.to(dt).float(), latent), key           # (the unsnapped deltas are not)
    plain = copy.deepcopy(model)
    remove_grid(plain)
    model.save_pretrained(tmp_path / "out")
    out = tmp_path / "merged" / "m.gguf"
    out.parent.mkdir()
    details, _ = merged_json(base, tmp_path / "out", out, capsys)
    assert details["blocks_reencoded"] == 0
    assert out.stat().st_size == base.stat().st_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        merged = merge_and_unload(model)
        assert torch.equal(merged(input_ids=ids).logits, logits)             # training forward == the merge
    want = merged.state_dict()
    mv = gn.open_gguf_base(out)
    for key in types:
        got = np.asarray(mv.array(key)).astype(np.float32)
        np.testing.assert_array_equal(got, want[key].numpy(), err_msg=key)
    read = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    got = read.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in types)
    with torch.no_grad():
        assert torch.equal(read(input_ids=ids).logits, logits)               # the file serves the runtime's logits
        # without the float grids (the latent deltas) the F16/BF16 merge would round off the runtime's values
        unsnapped = merge_and_unload(plain).state_dict()
    assert not torch.equal(unsnapped[f16], got[f16]) or not torch.equal(unsnapped[bf16], got[bf16])


def test_float_grid_rounding_edges():
    """FloatGrid rounds as rule M (round-to-nearest-even): f32(w0) + delta is that value, and the spec's merge of
    the snapped deltas gives it back. Beyond the dtype's range it stops at the largest finite value; a power of
    two that no f32 delta reaches from a tiny w0 of the other sign becomes the dtype's next value toward zero;
    an infinite w0 stays; NaN stays NaN; the gradient passes straight through."""
    import ml_dtypes

    gen = torch.Generator().manual_seed(0)
    cases = (("F16", torch.float16, np.float16, float.fromhex("-0x1.58p-19"), 4.0),
             ("BF16", torch.bfloat16, ml_dtypes.bfloat16, float.fromhex("-0x1.6p-24"), 0.5))
    for qtype, dt, npdt, tiny, power in cases:
        grid = FloatGrid(qtype)
        w0 = torch.randn(8, 64, generator=gen).to(dt).float()
        w0[0, :4] = torch.tensor([0.0, -0.0, 1e-7, 1.0]).to(dt).float()    # zeros, a subnormal (F16)
        val = torch.randn(8, 64, generator=gen) * 1e-3
        val[0, 3] = 2.0 ** -11  # 1 + half an F16 step: a tie, to even (1)
        idx = torch.arange(64).expand(8, 64).contiguous()
        d = grid(val, idx, w0)
        want = naf.merge_weight(w0.numpy().astype(npdt), [(idx.numpy(), val.numpy())])  # the spec's rounding
        assert np.array_equal((w0 + d).numpy(), want.astype(np.float32)), qtype
        assert np.array_equal(naf.merge_weight(w0.numpy().astype(npdt), [(idx.numpy(), d.numpy())]), want)

        big = torch.finfo(dt).max
        edge_w0 = torch.tensor([[big, 1.0, tiny, float("inf"), 1.0]]).to(dt).float()
        edge_val = torch.tensor([[big, float("inf"), power - tiny, 1.0, float("nan")]])
        e = grid.snap(edge_val, torch.arange(5)[None], edge_w0)
        merged = edge_w0 + e
        assert merged[0, 0] == big and merged[0, 1] == big                    # the largest finite value
        c = torch.tensor(power, dtype=torch.float32) - edge_w0[0, 2]         # no f32 delta reaches the power
        assert not any(edge_w0[0, 2] + x == power for x in (c, c.nextafter(c + 1), c.nextafter(c - 1)))
        assert merged[0, 2] == torch.nextafter(torch.tensor(power, dtype=dt), torch.tensor(0.0, dtype=dt)).float()
        assert e[0, 3] == 0 and merged[0, 3] == float("inf")                 # an infinite w0 stays
        assert e[0, 4].isnan()
        finite = merged[0, :4]
        assert torch.equal(finite.to(dt).float(), finite)                     # every merged value in the dtype
        v = val.clone().requires_grad_(True)
        grid(v, idx, w0).sum().backward()
        assert torch.equal(v.grad, torch.ones_like(v))
