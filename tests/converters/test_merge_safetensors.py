"""merge_safetensors / merge_in_place / revert on real safetensors checkpoints (tiny Llama-shaped ones).

The expected output of a merge is built independently: the base file's bytes with each touched tensor
replaced by `merge_weight`'s reference result; the merged file must equal it byte for byte, which
covers the merged values, every other tensor, the header and `__metadata__` at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import neuroada_format as naf
from neuroada_format.converters.journal import read_journal, revert
from neuroada_format.converters.safetensors_merge import (
    Mismatch,
    merge_in_place,
    merge_safetensors,
    temp_sibling,
)
from neuroada_format.dtypes import NUMPY_DTYPES

DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
CONV1D = "transformer.h.0.mlp.c_fc.weight"


# -- builders (also used by test_merge_cli.py and test_fault_injection.py) ----------------------------
def llama_arrays(rng, dtype="BF16", *, layers=2, hidden=64, inter=160, kv=32, vocab=128, conv1d=True):
    """A Llama-shaped state dict (plus one GPT-2 Conv1D weight stored [in, out]) of numpy arrays."""
    dt = DTYPES[dtype]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(dt)

    arrays = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": w(hidden),
              "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        arrays.update({
            p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv, hidden),
            p + "self_attn.v_proj.weight": w(kv, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
            p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": w(hidden), p + "post_attention_layernorm.weight": w(hidden),
        })
    if conv1d:
        arrays[CONV1D] = w(hidden, inter)
        arrays["transformer.h.0.mlp.c_fc.bias"] = w(inter)
    return arrays


def layout_of(name: str) -> str:
    return "in_out" if name.startswith("transformer.h.") else "out_in"


def targets_of(arrays) -> list[str]:
    return sorted(n for n in arrays if n.endswith("_proj.weight") or n == CONV1D)


def make_adapter(rng, arrays, names, k, *, value_dtype="BF16", select="magnitude", scale=0.05) -> naf.Adapter:
    targets = {}
    for name in names:
        w = arrays[name]
        canon = w if layout_of(name) == "out_in" else w.T
        if select == "magnitude":
            idx = naf.select_indices(canon, k)
        else:
            idx = np.sort(np.argpartition(rng.random(canon.shape), k - 1, axis=1)[:, :k], axis=1)
        values = (rng.standard_normal(idx.shape) * scale).astype(DTYPES[value_dtype])
        targets[name] = naf.Target.from_weight(name, w, idx, values, layout=layout_of(name), value_dtype=value_dtype)
    return naf.Adapter(targets, base_name="tiny-llama", base_revision="test",
                       structure_hash=naf.ArrayBase(arrays).structure_hash(),
                       selection={"rule": select if select == "magnitude" else "random", "tie_break": "lower-column",
                                  **({} if select == "magnitude" else {"seed": 7})})


def write_checkpoint(folder, arrays, *, shards=2, extras=True, single_name="model.safetensors"):
    """A HF-like folder: weights (1 file or N shards + index json) and the usual side files."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(arrays)
    if shards <= 1:
        save_file({n: arrays[n] for n in names}, os.path.join(folder, single_name), metadata={"format": "pt"})
    else:
        weight_map, per = {}, -(-len(names) // shards)
        for s in range(shards):
            shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s * per:(s + 1) * per]
            save_file({n: arrays[n] for n in part}, os.path.join(folder, shard),
                      metadata={"format": "pt", "shard": str(s)})
            weight_map.update(dict.fromkeys(part, shard))
        index = {"metadata": {"total_size": sum(int(a.nbytes) for a in arrays.values())}, "weight_map": weight_map}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    if extras:
        for name, text in {"config.json": '{"model_type": "llama"}', "tokenizer.json": '{"v": 1}',
                           "generation_config.json": "{}", "sub/notes.txt": "carried over"}.items():
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
    return os.fspath(folder)


def header_of(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def expected_bytes(path, adapters) -> bytes:
    """The file at `path` with every touched tensor replaced by the reference merge (merge_weight)."""
    data = bytearray(open(path, "rb").read())
    start, header = header_of(path)
    with safe_open(path, framework="np") as f:
        for name in f.keys():
            deltas = [(a.targets[name], s) for a, s in adapters if name in a.targets]
            if not deltas:
                continue
            ref = naf.merge_weight(f.get_tensor(name), deltas, deltas[0][0].layout)
            b, e = header[name]["data_offsets"]
            assert ref.nbytes == e - b
            data[start + b:start + e] = ref.tobytes()
    return bytes(data)


def tree_digest(root) -> dict[str, str]:
    """relative path -> sha256 of every file under root but journals (a file root maps to its name)."""
    root = os.fspath(root)
    if os.path.isfile(root):
        return {os.path.basename(root): hashlib.sha256(open(root, "rb").read()).hexdigest()}
    out = {}
    for here, _, names in os.walk(root):
        for n in names:
            if n.startswith(".neuroada-journal-"):
                continue
            p = os.path.join(here, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def siblings(path) -> list[str]:
    folder, name = os.path.split(os.fspath(path))
    return sorted(e for e in os.listdir(folder) if e.startswith(name + ".tmp-"))


@pytest.fixture
def rng():
    return np.random.default_rng(20261128)


def _three_adapters(rng, arrays):
    names = targets_of(arrays)
    a = make_adapter(rng, arrays, names, 4)
    b = make_adapter(rng, arrays, names[::2], 6, select="random", value_dtype="F32")
    c = make_adapter(rng, arrays, names[1:], 2, value_dtype="F16", scale=0.5)
    return [(a, 1.0), (b, 0.5), (c, -1.25)]


# -- merge into a new checkpoint ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("kind", ["file", "folder", "sharded"])
@pytest.mark.parametrize("several", [False, True])
def test_merge_is_the_reference_byte_for_byte(tmp_path, rng, dtype, kind, several):
    arrays = llama_arrays(rng, dtype)
    if kind == "file":
        save_file(arrays, tmp_path / "base.safetensors", metadata={"format": "pt"})
        base, out = tmp_path / "base.safetensors", tmp_path / "merged.safetensors"
    else:
        base, out = write_checkpoint(tmp_path / "base", arrays, shards=3 if kind == "sharded" else 1), tmp_path / "out"
    adapters = _three_adapters(rng, arrays) if several else [(make_adapter(rng, arrays, targets_of(arrays), 3), 1.0)]
    if several:  # through files, as the CLI does
        for i, (a, _) in enumerate(adapters):
            naf.save(a, tmp_path / f"a{i}.safetensors")
        adapters = [(naf.load(tmp_path / f"a{i}.safetensors"), s) for i, (_, s) in enumerate(adapters)]
    before = tree_digest(base)

    summary = merge_safetensors(base, adapters, out)

    assert tree_digest(base) == before
    assert summary.targets == len(targets_of(arrays)) and summary.values_touched > 0
    json.dumps(summary.to_dict())
    assert siblings(out) == []
    if kind == "file":
        assert open(out, "rb").read() == expected_bytes(base, adapters)
        return
    got, want = tree_digest(out), tree_digest(base)
    assert sorted(got) == sorted(want)  # same files, subfolders included
    for rel in want:
        src, dst = os.path.join(base, rel), os.path.join(out, rel)
        if rel.endswith(".safetensors"):
            assert open(dst, "rb").read() == expected_bytes(src, adapters), rel
            assert header_of(dst) == header_of(src)  # layout and __metadata__ ({"format": "pt"}) kept
        else:
            assert got[rel] == want[rel], rel  # index json, config, tokenizer, sub/notes.txt
        assert os.stat(dst).st_mode == os.stat(src).st_mode
    with safe_open(os.path.join(out, "model.safetensors" if kind == "folder" else
                                "model-00001-of-00003.safetensors"), framework="np") as f:
        assert f.metadata()["format"] == "pt"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_copy_keeps_the_modes_of_subfolders_and_their_files(tmp_path, rng):
    """Audit: subfolders of a copied base folder came out with the umask's mode (a 0750 sub/ as 0755, a 0500
    sub/deep as 0755); files kept theirs. Folders now keep BASE's bits, plus the owner's rwx as the top folder
    does (so the output stays removable), set after their files are in."""
    arrays = llama_arrays(rng)
    base = write_checkpoint(tmp_path / "base", arrays, shards=2)
    deep = tmp_path / "base" / "sub" / "deep"
    deep.mkdir()
    (deep / "x.txt").write_text("x")
    modes = {"sub/deep/x.txt": 0o400, "sub/notes.txt": 0o640, "model-00001-of-00002.safetensors": 0o600,
             "sub/deep": 0o500, "sub": 0o750}
    for rel, mode in modes.items():
        os.chmod(os.path.join(base, rel), mode)
    out = tmp_path / "out"
    try:
        adapter = make_adapter(rng, arrays, targets_of(arrays), 3)
        merge_safetensors(base, [(adapter, 1.0)], out)
        got = {rel: stat.S_IMODE(os.stat(out / rel).st_mode) for rel in modes}
        assert got == {**modes, "sub/deep": 0o700}, {k: oct(v) for k, v in got.items()}
        merge_safetensors(base, [(adapter, 0.5)], out, overwrite=True)  # the old output is still removable
        assert stat.S_IMODE(os.stat(out / "sub").st_mode) == 0o750
    finally:
        for folder in (deep, out / "sub" / "deep"):
            if folder.exists():
                os.chmod(folder, 0o700)


@pytest.mark.parametrize("block,gap,chunk", [(2, 2, 1), (64, 8, 5), (4 << 20, 8 << 10, 64 << 10)])
def test_in_place_patch_spans_match_the_reference(tmp_path, rng, monkeypatch, block, gap, chunk):
    """patch_values reads, patches and writes back spans of close values and writes lone values by themselves:
    bit for bit what assigning into the array gives, whatever the span, gap and I/O sizes cut (values alone, runs
    longer than a span, a span of one value), and not one byte outside the tensor."""
    from neuroada_format.converters import tensor_map

    monkeypatch.setattr(tensor_map, "READ_BLOCK", block)
    monkeypatch.setattr(tensor_map, "PATCH_GAP", gap)
    monkeypatch.setattr(tensor_map, "IO_CHUNK", chunk)
    monkeypatch.setattr(tensor_map, "WRITE_CHUNK", chunk + 3)
    for dtype, count in (("BF16", 5000), ("F32", 3001), ("F16", 1)):
        raw = rng.integers(0, 256, 100 + count * NUMPY_DTYPES[dtype].itemsize + 77, dtype=np.uint8)
        path = tmp_path / f"t-{dtype}"
        path.write_bytes(raw.tobytes())
        clusters = np.concatenate([np.arange(10, 60), rng.choice(count, min(count, 400), replace=False), [count - 1]])
        positions = np.unique(clusters[clusters < count]).astype(np.int64)
        values = rng.integers(0, 256, positions.size * NUMPY_DTYPES[dtype].itemsize, dtype=np.uint8)
        values = values.view(NUMPY_DTYPES[dtype])
        tensor_map.patch_values(str(path), dtype, 100, count, positions, values)
        want = raw.copy()
        want[100:100 + count * values.itemsize].view(NUMPY_DTYPES[dtype])[positions] = values
        assert path.read_bytes() == want.tobytes(), dtype


@pytest.mark.parametrize("block,chunk", [(1, 7), (300, 64), (4096, 1000)])
def test_blockwise_streaming_matches_the_reference(tmp_path, rng, monkeypatch, block, chunk):
    """Touched tensors stream through the buffer in row blocks (out_in) or whole (Conv1D), with reads
    and writes split into IO_CHUNK / WRITE_CHUNK pieces; tiny sizes force every boundary: a block of one row, blocks
    that split a tensor unevenly, calls that split a row. Several adapters, every dtype and layout."""
    from neuroada_format.converters import safetensors_merge as sm, tensor_map

    monkeypatch.setattr(sm, "BLOCK_BYTES", block)
    monkeypatch.setattr(tensor_map, "IO_CHUNK", chunk)
    monkeypatch.setattr(tensor_map, "WRITE_CHUNK", chunk + 3)
    for dtype in ("F32", "BF16"):
        arrays = llama_arrays(rng, dtype)
        base = write_checkpoint(tmp_path / f"base-{dtype}-{block}", arrays, shards=2)
        adapters = _three_adapters(rng, arrays)
        out = tmp_path / f"out-{dtype}-{block}"
        merge_safetensors(base, adapters, out)
        for rel in os.listdir(base):
            if rel.endswith(".safetensors"):
                assert open(out / rel, "rb").read() == expected_bytes(os.path.join(base, rel), adapters), rel
        # and a changed value in a later block of a big target is still caught (rule 4.3)
        victim = "model.layers.1.mlp.down_proj.weight"
        t = adapters[0][0].targets[victim]
        bad = dict(arrays)
        bad[victim] = arrays[victim].copy()
        r = t.d_out - 1
        bad[victim][r, int(t.indices[r, 0])] += np.asarray(1, arrays[victim].dtype)
        base2 = write_checkpoint(tmp_path / f"bad-{dtype}-{block}", bad, shards=2)
        with pytest.raises(Mismatch, match="rule 4.3") as info:
            merge_safetensors(base2, adapters[:1], tmp_path / f"never-{dtype}-{block}")
        assert info.value.tensor == victim and not (tmp_path / f"never-{dtype}-{block}").exists()


def test_merged_checkpoint_loads_in_transformers(tmp_path, rng):
    """A merged folder is still a checkpoint transformers accepts, with the merged values."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    arrays = {}
    for f in os.listdir(tmp_path / "base"):
        if f.endswith(".safetensors"):
            with safe_open(tmp_path / "base" / f, framework="np") as st:
                arrays.update({k: st.get_tensor(k) for k in st.keys()})
    adapter = make_adapter(rng, arrays, targets_of(arrays), 4, scale=1.0)
    merge_safetensors(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out")
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    name = "model.layers.1.mlp.down_proj.weight"
    ref = naf.merge_weight(arrays[name], [adapter.targets[name]])
    got = merged.state_dict()[name].view(torch.int16).numpy()
    assert np.array_equal(got, ref.view(np.int16))


def test_existing_output_is_refused_then_replaced_atomically(tmp_path, rng):
    arrays = llama_arrays(rng)
    base = write_checkpoint(tmp_path / "base", arrays)
    a1, a2 = (make_adapter(rng, arrays, targets_of(arrays), k) for k in (2, 5))
    merge_safetensors(base, [(a1, 1.0)], tmp_path / "out")
    with pytest.raises(naf.NeuroAdaError, match="already exists"):
        merge_safetensors(base, [(a2, 1.0)], tmp_path / "out")
    (tmp_path / "out" / "stale-file").write_text("from an older merge")
    merge_safetensors(base, [(a2, 1.0)], tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale-file").exists()
    shard = "model-00001-of-00002.safetensors"
    assert open(tmp_path / "out" / shard, "rb").read() == expected_bytes(os.path.join(base, shard), [(a2, 1.0)])
    assert siblings(tmp_path / "out") == []
    # a file base over a file output
    save_file(arrays, tmp_path / "b.safetensors", metadata={"format": "pt"})
    (tmp_path / "o.safetensors").write_bytes(b"old")
    merge_safetensors(tmp_path / "b.safetensors", [(a1, 1.0)], tmp_path / "o.safetensors", overwrite=True)
    assert open(tmp_path / "o.safetensors", "rb").read() == expected_bytes(tmp_path / "b.safetensors", [(a1, 1.0)])
    with pytest.raises(naf.NeuroAdaError, match="is a folder"):
        merge_safetensors(tmp_path / "b.safetensors", [(a1, 1.0)], tmp_path / "out", overwrite=True)


@pytest.mark.parametrize("where", ["base", "inside"])
def test_output_at_or_inside_the_base_is_refused(tmp_path, rng, where):
    arrays = llama_arrays(rng, conv1d=False)
    base = write_checkpoint(tmp_path / "base", arrays, extras=False)
    out = base if where == "base" else os.path.join(base, "merged")
    before = tree_digest(base)
    with pytest.raises(naf.NeuroAdaError):
        merge_safetensors(base, [(make_adapter(rng, arrays, targets_of(arrays), 2), 1.0)], out, overwrite=True)
    assert tree_digest(base) == before


def _apply_verification_failure(tmp_path, rng, failure):
    """A base + adapter pair with one defect; returns (base, adapter, tensor the error must name)."""
    arrays = llama_arrays(rng)
    adapter = make_adapter(rng, arrays, targets_of(arrays), 3)
    victim = "model.layers.1.mlp.up_proj.weight"
    if failure == "wrong base":
        arrays = llama_arrays(np.random.default_rng(999))
    elif failure == "tampered value":
        t = adapter.targets[victim]
        arrays[victim] = arrays[victim].copy()
        r, c = 5, int(t.indices[5, 1])
        arrays[victim][r, c] = arrays[victim][r, c] * 2 + np.asarray(0.5, arrays[victim].dtype)
    elif failure == "wrong shape":
        arrays[victim] = arrays[victim][:, :-8].copy()
    elif failure == "missing tensor":
        del arrays[victim]
    return write_checkpoint(tmp_path / "base", arrays), adapter, victim


# (a base that holds the same values in another dtype is the adapter's base since spec 1.1's identity on values)
@pytest.mark.parametrize("failure", ["wrong base", "tampered value", "wrong shape", "missing tensor"])
def test_verification_failure_writes_nothing(tmp_path, rng, failure):
    base, adapter, victim = _apply_verification_failure(tmp_path, rng, failure)
    with pytest.raises(Mismatch) as info:
        merge_safetensors(base, [(adapter, 1.0)], tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and info.value.rule.startswith("4.")
    if failure != "wrong base":
        assert info.value.tensor == victim
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []
    with pytest.raises(Mismatch):
        merge_in_place(base, [(adapter, 1.0)], journal=tmp_path / "j.safetensors")
    assert not (tmp_path / "j.safetensors").exists()


def test_wrong_base_fails_before_copying_a_tampered_target_while_copying(tmp_path, rng, monkeypatch):
    """Each adapter's smallest target is probed in BASE before any copy; every other target is probed
    from the read that copies and merges it. Both stop the merge with rule 4.3 and no OUT."""
    from neuroada_format.converters import safetensors_merge as sm

    copied = []
    real = sm.copy_file
    monkeypatch.setattr(sm, "copy_file", lambda src, *a, **k: copied.append(src) or real(src, *a, **k))
    base, adapter, _ = _apply_verification_failure(tmp_path, rng, "wrong base")
    with pytest.raises(Mismatch, match="rule 4.3"):
        merge_safetensors(base, [(adapter, 1.0)], tmp_path / "out")
    assert copied == [] and siblings(tmp_path / "out") == []
    shutil.rmtree(base)
    base, adapter, victim = _apply_verification_failure(tmp_path, rng, "tampered value")
    assert victim != min(adapter.targets.values(), key=lambda t: t.d_out * t.k).name
    with pytest.raises(Mismatch, match="rule 4.3") as info:
        merge_safetensors(base, [(adapter, 1.0)], tmp_path / "out")
    assert info.value.tensor == victim and copied  # found while copying
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []


def test_no_verify_skips_only_the_value_checks(tmp_path, rng):
    base, adapter, victim = _apply_verification_failure(tmp_path, rng, "tampered value")
    summary = merge_safetensors(base, [(adapter, 1.0)], tmp_path / "out", verify=False)
    assert summary.verified is False and (tmp_path / "out").is_dir()
    shutil.rmtree(tmp_path / "base")
    base, adapter, victim = _apply_verification_failure(tmp_path, rng, "wrong shape")
    with pytest.raises(Mismatch, match="rule 4.2") as info:
        merge_safetensors(base, [(adapter, 1.0)], tmp_path / "out2", verify=False)
    assert info.value.tensor == victim and not (tmp_path / "out2").exists()


def test_adapters_disagreeing_on_layout_are_refused(tmp_path, rng):
    """A square weight fits both layouts; summing deltas meant for different orientations is nonsense."""
    arrays = llama_arrays(rng, conv1d=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    w = arrays[name]
    a = naf.Adapter({name: naf.Target.from_weight(name, w, naf.select_indices(w, 2), layout="out_in")})
    b = naf.Adapter({name: naf.Target.from_weight(name, w, naf.select_indices(w.T, 2), layout="in_out")})
    base = write_checkpoint(tmp_path / "base", arrays, extras=False)
    with pytest.raises(Mismatch, match="layout"):
        merge_safetensors(base, [(a, 1.0), (b, 1.0)], tmp_path / "out")


def test_stale_siblings_of_dead_merges_are_removed(tmp_path, rng):
    arrays = llama_arrays(rng, conv1d=False)
    base = write_checkpoint(tmp_path / "base", arrays, extras=False)
    out = os.fspath(tmp_path / "out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    stale_dir = temp_sibling(out).replace(f"-{os.getpid()}-", f"-{pid}-")
    os.makedirs(os.path.join(stale_dir, "sub"))
    live = temp_sibling(out).replace(f"-{os.getpid()}-", "-1-")  # pid 1 is alive: not ours to delete
    open(live, "w").close()
    foreign = out + ".tmp-otherhost-" + str(pid) + "-abcd1234"
    open(foreign, "w").close()
    summary = merge_safetensors(base, [(make_adapter(rng, arrays, targets_of(arrays), 2), 1.0)], out)
    assert summary.removed_stale == [stale_dir]
    assert siblings(out) == sorted(os.path.basename(p) for p in (live, foreign))


def test_a_failing_file_stops_the_other_copies_and_leaves_nothing(tmp_path, rng, monkeypatch):
    """Files are copied side by side; when one fails, the others stop and the temporary folder goes."""
    from neuroada_format.converters import safetensors_merge as sm

    arrays = llama_arrays(rng, conv1d=False)
    base = write_checkpoint(tmp_path / "base", arrays, shards=3)
    out = tmp_path / "out"
    before = tree_digest(base)
    monkeypatch.setattr(sm, "copy_workers", lambda files: 2)
    real = sm.copy_file
    seen = []

    def flaky(src, dst, progress, stop=None, **kwargs):
        seen.append(os.path.basename(src))
        if src.endswith("config.json"):
            raise OSError(28, "No space left on device", dst)
        return real(src, dst, progress, stop, **kwargs)

    monkeypatch.setattr(sm, "copy_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        merge_safetensors(base, [(make_adapter(rng, arrays, targets_of(arrays), 2), 1.0)], out)
    assert not os.path.lexists(out) and siblings(out) == []
    assert tree_digest(base) == before
    assert len(seen) >= 2  # several files were under way


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files through /proc")
@pytest.mark.parametrize("durable", [False, True])
def test_outputs_are_fsynced_only_when_asked_the_journal_always(tmp_path, rng, monkeypatch, durable):
    arrays = llama_arrays(rng, conv1d=False)
    base = write_checkpoint(tmp_path / "base", arrays, shards=2)
    adapter = make_adapter(rng, arrays, targets_of(arrays), 2)
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    summary = merge_safetensors(base, [(adapter, 1.0)], tmp_path / "out", durable=durable)
    assert summary.durable is durable
    files = {f for f in tree_digest(base)}
    assert ({os.path.basename(f) for f in files} <= set(synced)) is durable
    assert (len(synced) > 0) is durable
    synced.clear()
    summary = merge_in_place(base, [(adapter, 1.0)], durable=durable)
    journal = os.path.basename(summary.journal)
    assert any(n.startswith(journal) for n in synced)  # written under a temporary name, then renamed
    shards = {os.path.basename(f) for f in files if f.endswith(".safetensors")}
    assert (shards <= set(synced)) is durable


# -- in place and revert -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "sharded"])
def test_in_place_then_revert_is_bit_exact_and_idempotent(tmp_path, rng, kind):
    arrays = llama_arrays(rng, "BF16")
    if kind == "file":
        base = os.fspath(tmp_path / "model.safetensors")
        save_file(arrays, base, metadata={"format": "pt"})
    else:
        base = write_checkpoint(tmp_path / "base", arrays, shards=2)
    adapters = _three_adapters(rng, arrays)
    pristine = tree_digest(base)
    merge_safetensors(base, adapters, tmp_path / "copy")  # the copy merge is the expected result

    summary = merge_in_place(base, adapters)

    journal = summary.journal
    expected_folder = os.path.dirname(base) if kind == "file" else base
    assert os.path.dirname(journal) == expected_folder and os.path.basename(journal).startswith(".neuroada-journal-")
    assert sorted(tree_digest(base).values()) == sorted(tree_digest(tmp_path / "copy").values())
    assert tree_digest(base) != pristine
    with safe_open(journal, framework="np") as f:  # an ordinary safetensors file (its header padded with spaces)
        assert f.metadata()["format"] == "neuroada-journal"
        assert any(k.startswith("original/") for k in f.keys())
        ours = read_journal(journal)
        assert len(list(f.keys())) == 3 * len(ours.targets())
        for e in ours.entries():
            for prefix, a in (("positions/", e.positions), ("original/", e.original), ("merged/", e.merged)):
                assert f.get_tensor(prefix + e.tensor).tobytes() == a.tobytes()

    first = revert(journal)
    assert tree_digest(base) == pristine
    assert first["targets_restored"] == len(targets_of(arrays))
    second = revert(journal)
    assert second["targets_restored"] == 0 and second["targets_already_original"] == first["targets"]
    assert tree_digest(base) == pristine


def test_in_place_merge_and_revert_hold_one_tensor_of_the_journal_at_a_time(tmp_path, rng):
    """The journal was built whole in memory before it was written (and its serialised copy beside it): ~7.8x the
    adapter file at its peak, ~0.8 GB for a 7B at k=20. It is written a tensor at a time now, and the merge and
    the revert read it back a tensor at a time."""
    import tracemalloc

    arrays = llama_arrays(rng, "F32", layers=4, hidden=128, inter=256, kv=64)
    base = write_checkpoint(tmp_path / "base", arrays, extras=False)
    adapter = make_adapter(rng, arrays, targets_of(arrays), 32)
    pristine = tree_digest(base)
    tracemalloc.start()
    try:
        journal = merge_in_place(base, [(adapter, 1.0)]).journal
        merge_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        revert(journal)
        revert_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    data = sum(e.positions.nbytes + e.original.nbytes + e.merged.nbytes for e in read_journal(journal).entries())
    largest = max(e.positions.nbytes + e.original.nbytes + e.merged.nbytes for e in read_journal(journal).entries())
    assert data > 14 * largest  # many targets, so holding them all would show
    # a handful of one target's arrays (positions in two widths, the merge's working copies) and the base tensor
    assert merge_peak < data / 2 and revert_peak < data / 2, (merge_peak, revert_peak, data)
    assert tree_digest(base) == pristine


def test_stacked_in_place_merges_revert_newest_first(tmp_path, rng):
    arrays = llama_arrays(rng)
    base = write_checkpoint(tmp_path / "base", arrays, extras=False)
    pristine = tree_digest(base)
    a = make_adapter(rng, arrays, targets_of(arrays), 4)
    after_a = None
    ja = merge_in_place(base, [(a, 1.0)], journal=tmp_path / "ja.safetensors").journal
    after_a = tree_digest(base)
    # B must be checked against the merged base, so skip its probe check (it was made for the original)
    b = make_adapter(rng, arrays, targets_of(arrays), 4)
    jb = merge_in_place(base, [(b, 1.0)], journal=tmp_path / "jb.safetensors", verify=False).journal
    with pytest.raises(Mismatch, match="neither the merged nor the original"):
        revert(ja)
    revert(jb)
    assert tree_digest(base) == after_a
    revert(ja)
    assert tree_digest(base) == pristine


def test_revert_refuses_other_files(tmp_path, rng):
    arrays = llama_arrays(rng)
    base = write_checkpoint(tmp_path / "base", arrays, extras=False)
    journal = merge_in_place(base, [(make_adapter(rng, arrays, targets_of(arrays), 3), 1.0)]).journal
    # same headers, other values (e.g. another fine-tune of the same architecture)
    other = shutil.copytree(base, tmp_path / "other", ignore=shutil.ignore_patterns(".neuroada-journal-*"))
    for name in os.listdir(other):
        if name.endswith(".safetensors"):
            start, _ = header_of(other / name)
            data = np.memmap(other / name, dtype=np.uint8, mode="r+", offset=start)
            data[:] = np.random.default_rng(5).integers(0, 255, data.size, dtype=np.uint8)
            data.flush()
            del data
    before = tree_digest(other)
    with pytest.raises(Mismatch, match="neither"):
        revert(journal, base=other)
    # another structure: the header hash differs
    smaller = write_checkpoint(tmp_path / "smaller", llama_arrays(rng, layers=1), extras=False)
    with pytest.raises(Mismatch, match="header differs"):
        revert(journal, base=smaller)
    assert tree_digest(other) == before
    # an adapter is not a journal
    naf.save(make_adapter(rng, arrays, targets_of(arrays), 3), tmp_path / "a.safetensors")
    with pytest.raises(naf.NeuroAdaError, match="journal"):
        read_journal(tmp_path / "a.safetensors")


def test_revert_base_file_is_the_file_reverted(tmp_path, rng):
    """Audit: `--revert J --base backup.safetensors` for a single-file base reverted model.safetensors (the name the
    journal recorded, in backup's folder) and left backup merged. The one file is now mapped to the name given;
    a file that is none of a sharded journal's files is refused."""
    arrays = llama_arrays(rng)
    base = os.fspath(tmp_path / "model.safetensors")
    save_file(arrays, base, metadata={"format": "pt"})
    pristine = tree_digest(base)["model.safetensors"]
    journal = merge_in_place(base, [(make_adapter(rng, arrays, targets_of(arrays), 3), 1.0)]).journal
    merged = tree_digest(base)["model.safetensors"]
    moved = tmp_path / "moved"
    moved.mkdir()
    backup = moved / "backup.safetensors"
    shutil.copyfile(base, backup)
    shutil.copyfile(base, moved / "model.safetensors")  # the journal's name, in the folder of the file given
    revert(journal, base=backup)
    assert tree_digest(backup)["backup.safetensors"] == pristine
    assert tree_digest(moved / "model.safetensors")["model.safetensors"] == merged
    assert tree_digest(base)["model.safetensors"] == merged

    folder = write_checkpoint(tmp_path / "sharded", arrays, shards=2, extras=False)
    journal = merge_in_place(folder, [(make_adapter(rng, arrays, targets_of(arrays), 3), 1.0)]).journal
    before = tree_digest(folder)
    shutil.copyfile(os.path.join(folder, "model-00001-of-00002.safetensors"), tmp_path / "sharded" / "other.safetensors")
    with pytest.raises(naf.NeuroAdaUsageError, match="describes 2 files .* none of them"):
        revert(journal, base=tmp_path / "sharded" / "other.safetensors")
    assert {k: v for k, v in tree_digest(folder).items() if k != "other.safetensors"} == before


def test_revert_refuses_a_hard_linked_file(tmp_path, rng, capsys):
    """Audit: --revert patched a shard with another hard link (linked after the merge, e.g. into a snapshot),
    so the other name changed too. It is refused before anything is written, as the in-place merge is."""
    from neuroada_format.converters.merge_cli import run

    arrays = llama_arrays(rng)
    base = write_checkpoint(tmp_path / "base", arrays, shards=2, extras=False)
    pristine = tree_digest(base)
    journal = merge_in_place(base, [(make_adapter(rng, arrays, targets_of(arrays), 3), 1.0)]).journal
    merged = tree_digest(base)
    shard = os.path.join(base, "model-00001-of-00002.safetensors")
    os.link(shard, tmp_path / "elsewhere.safetensors")
    assert run(["--revert", journal]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 2 hard links" in err and shard in err
    assert tree_digest(base) == merged and tree_digest(tmp_path / "elsewhere.safetensors") == \
        {"elsewhere.safetensors": merged["model-00001-of-00002.safetensors"]}
    shutil.copyfile(shard, shard + ".copy")  # the way out the message gives
    os.replace(shard + ".copy", shard)
    revert(journal)
    assert tree_digest(base) == pristine
    assert tree_digest(tmp_path / "elsewhere.safetensors")["elsewhere.safetensors"] == \
        merged["model-00001-of-00002.safetensors"]


@pytest.mark.parametrize("layout", ["single file", "shards"])
def test_in_place_refuses_symlinked_and_hard_linked_files(tmp_path, rng, layout):
    """A Hugging Face cache snapshot links to shared blobs: patching through the link is refused."""
    arrays = llama_arrays(rng)
    snapshot = tmp_path / "snapshot"
    if layout == "single file":  # snapshots/<rev>/model.safetensors -> ../../blobs/<sha>
        blobs = tmp_path / "blobs"
        real = write_checkpoint(blobs, arrays, shards=1, extras=False)
    else:  # links that stay inside the folder (the format core refuses shards resolving outside it)
        blobs = snapshot / ".blobs"
        real = write_checkpoint(blobs, arrays, shards=2, extras=False)
    snapshot.mkdir(exist_ok=True)
    for name in os.listdir(real):
        os.symlink(os.path.join(real, name), snapshot / name)
    adapter = make_adapter(rng, arrays, targets_of(arrays), 3)
    before = tree_digest(real)
    for base in (snapshot, snapshot / "model.safetensors") if layout == "single file" else (snapshot,):
        with pytest.raises(naf.NeuroAdaError, match="symlink.*copy the checkpoint first"):
            merge_in_place(base, [(adapter, 1.0)])
    assert tree_digest(real) == before and not [e for e in os.listdir(snapshot) if e.startswith(".neuroada")]
    if layout == "single file":  # a copy merge from the snapshot follows the links, writes regular files
        merge_safetensors(snapshot, [(adapter, 1.0)], tmp_path / "out")
        assert not any(os.path.islink(tmp_path / "out" / n) for n in os.listdir(tmp_path / "out"))
        assert tree_digest(real) == before

    hard = tmp_path / "hard"
    hard.mkdir()
    for name in os.listdir(real):
        os.link(os.path.join(real, name), hard / name)
    with pytest.raises(naf.NeuroAdaError, match="hard links"):
        merge_in_place(hard, [(adapter, 1.0)])
    assert tree_digest(real) == before


def test_journals_are_not_carried_into_new_checkpoints(tmp_path, rng):
    arrays = llama_arrays(rng)
    base = write_checkpoint(tmp_path / "base", arrays, extras=False)
    adapter = make_adapter(rng, arrays, targets_of(arrays), 3)
    merge_in_place(base, [(adapter, 1.0)])
    merge_safetensors(base, [(adapter, 0.0)], tmp_path / "out", verify=False)
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".neuroada-journal")]
