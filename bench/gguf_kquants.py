"""How much of an adapter survives a merge into a K-quant GGUF (llama.cpp's Q4_K_M / Q5_K_M / Q2_K kind of file).

    python bench/gguf_kquants.py [--steps 40] [--type Q4_K] [--no-write]

SmolLM2-135M-Instruct's Q4_1 file re-typed the way llama.cpp falls back for this model: its hidden size 576 does
not split into K-quant super-blocks of 256, so only the 30 down_proj tensors (rows of 1536) can be K-quants; they
are encoded in --type from their Q4_1 values (`neuroada-merge --option target_type=` with a zero adapter), every
other tensor stays as it is. On that file's de-quantized weights, the main job's k=20 adapter (examples/lifecycle.py,
40 steps of 8 on its word-group task) is trained twice: plainly, and through the file's grids (`train_on_grid`:
Q4_1 blocks, K-quant sub-blocks). Rows: the plain adapter merged into the file with every tensor kept in its type
(the K-quant super-blocks re-encoded by converters/gguf_kquants.py), the same with touched tensors kept at F16, and
the grid-trained adapter merged in place. Retention = 1 - ||l_v - l_rt|| / ||l_rt - l_base|| over every position of
16 held-out prompts, as in bench/gguf_retention.py; l_rt is each adapter's own runtime merge (f32).

Writes the section "GGUF merge into K-quant files" of bench/RESULTS.md (--type Q4_K, the default), or one of its own
per other type ("GGUF merge into Q2_K files"), so that each type's numbers stay.
"""
from __future__ import annotations

import argparse
import os
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
import neuroada_format as naf  # noqa: E402
from gguf_retention import LOGIT_PROMPTS, attach_k20, retention, score, target_names, task  # noqa: E402
from neuroada_format.converters import gguf_merge as gm  # noqa: E402
from neuroada_format.converters import gguf_names as gn  # noqa: E402
from neuroada_format.runtime import save_adapter, train_on_grid  # noqa: E402
from results_md import replace_section, table  # noqa: E402

HEADING = "## GGUF merge into K-quant files (bench/gguf_kquants.py)"  # --type Q4_K's; the others: `heading`


def heading(ktype: str) -> str:
    return HEADING if ktype == "Q4_K" else f"## GGUF merge into {ktype} files (bench/gguf_kquants.py --type {ktype})"
CACHE = Path(os.environ.get("NEUROADA_CACHE") or Path.home() / ".cache" / "neuroada") / "bench-gguf"


def kquant_file(q41: Path, ktype: str) -> Path:
    """The Q4_1 file with its down_proj tensors encoded as ktype (cached): a merge of zero deltas re-typing them."""
    out = CACHE / f"smollm2-down-{ktype}.gguf"
    if out.exists():
        return out
    view = gn.open_gguf_base(q41)
    downs = [n for n in view.keys() if n.endswith("mlp.down_proj.weight")]
    zero = {}
    for n in downs:
        w = view.array(n)
        idx = naf.select_indices(w, 1)
        zero[n] = naf.Target.from_weight(n, w, idx, np.zeros(idx.shape, np.float32), value_dtype="F32")
    gm.merge_gguf(q41, [naf.Adapter(zero)], out, target_type=ktype)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--type", default="Q4_K", choices=["Q4_K", "Q5_K", "Q6_K", "Q2_K"])
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    q41 = smollm2.gguf_path()
    t0 = time.perf_counter()
    kfile = kquant_file(q41, args.type)
    print(f"-- {kfile.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    view = gn.open_gguf_base(kfile)
    types = {n: view.encoding(n) for n in view.keys() if n.endswith("proj.weight")}

    def load_on_file():
        """SmolLM2 with the K-quant file's de-quantized weights (only the down_proj tensors differ from Q4_1)."""
        model, tokenizer = smollm2.load(verbose=False)
        with torch.no_grad():
            for n, t in types.items():
                if t == args.type:
                    model.get_parameter(n).copy_(torch.from_numpy(np.asarray(view.array(n), np.float32)))
        return model, tokenizer

    model, tokenizer = load_on_file()
    encoded, plan, held_out = task(tokenizer, args.steps, args.seed)
    prompts = [it.prompt for it in held_out[:LOGIT_PROMPTS]]
    names = target_names(model)
    originals = {n: model.get_parameter(n).detach().clone() for n in names}

    def evaluate(weights):
        return score(model, tokenizer, names, originals, prompts, held_out, weights)

    adapters = {}
    for label, grid in (("plain", False), ("grid", True)):
        path = CACHE / f"k20-s{args.steps}-seed{args.seed}-down{args.type}-{label}.safetensors"
        if not path.exists():
            print(f"-- training k=20 ({label}, {args.steps} steps)", flush=True)
            trainee, _ = load_on_file()
            attach_k20(trainee)
            if grid:
                train_on_grid(trainee, kfile)
            lifecycle.train(trainee, tokenizer, encoded, plan, lr=args.lr, desc=f"k=20 {label}")
            save_adapter(trainee, path, value_dtype="F32")
            del trainee
        adapters[label] = naf.load(path)
        naf.validate(adapters[label], view).raise_if_invalid()

    l_base, acc_base = evaluate(None)
    size0 = os.path.getsize(kfile)
    rows = [["variant", "down_proj / other targets stored as", "file size vs the K file", "merge s", "retention",
             "max |logit diff| vs runtime", "accuracy"]]
    rows.append(["base model (no adapter)", f"{args.type} / Q4_1", "1.000", "-", "0.0%", "-", f"{acc_base:.1%}"])
    measured = {}
    for label in ("plain", "grid"):
        a = adapters[label]
        l_rt, acc_rt = evaluate({n: naf.merge_weight(originals[n].numpy(), [a.targets[n]]) for n in names})
        rows.append([f"{label} adapter: runtime merge (its reference)", "F32 in memory", "-", "-", "100%", "0",
                     f"{acc_rt:.1%}"])
        variants = [("kept types", f"{args.type} / Q4_1", {})]
        if label == "plain":
            variants.append(("touched tensors at F16", "F16 / F16", {"target_type": "F16"}))
        for what, stored, opts in variants:
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                out = Path(tmp) / "merged.gguf"
                t1 = time.perf_counter()
                s = gm.merge_gguf(kfile, [a], out, **opts)
                seconds = time.perf_counter() - t1
                merged = gn.open_gguf_base(out)
                weights = {n: np.asarray(merged.array(n), np.float32) for n in names}
                size = os.path.getsize(out)
            lv, acc = evaluate(weights)
            r = retention(lv, l_rt, l_base)
            measured[(label, what)] = (r, s.details)
            rows.append([f"{label} adapter: GGUF, {what}", stored, f"{size / size0:.3f}", f"{seconds:.1f}", f"{r:.1%}",
                         f"{np.abs(lv - l_rt).max():.2f}", f"{acc:.1%}"])
            print("   " + " | ".join(rows[-1]), flush=True)
    plain_d = measured[("plain", "kept types")][1]
    grid_d = measured[("grid", "kept types")][1]
    body = [
        f"SmolLM2-135M-Instruct `{q41.name}` with its 30 down_proj tensors encoded as {args.type} (`{kfile.name}`; "
        f"hidden size 576 does not split into 256-value super-blocks, so, as llama.cpp falls back for this model, "
        f"the other 180 projections stay Q4_1). Two k=20 adapters on the seven projections, {args.steps} steps of 8 "
        f"on the main job's word-group task, trained on this file's de-quantized weights: plainly, and through its "
        f"grids (`train_on_grid`: each Q4_1 block's, each {args.type} sub-block's). Retention = 1 - ||l_v - l_rt|| / "
        f"||l_rt - l_base|| over every position of {LOGIT_PROMPTS} held-out prompts, l_rt the adapter's own runtime "
        f"merge; accuracy on the {len(held_out)} held-out words (chance 25%).",
        "",
        table(rows),
        "",
        f"Blocks (Q4_1 blocks and {args.type} super-blocks) holding a touched value: plain adapter "
        f"{plain_d.get('blocks_reencoded', 0):,} re-encoded, {plain_d.get('blocks_on_grid', 0):,} on their grid; "
        f"grid-trained adapter {grid_d.get('blocks_reencoded', 0):,} re-encoded, "
        f"{grid_d.get('blocks_on_grid', 0):,} on their grid. Before K-quant encoding (converters/gguf_kquants.py) "
        f"such a file needed `--option requant=Q8_0`, which re-typed every touched K-quant tensor to Q8_0.",
    ]
    text = "\n".join(body)
    print("\n" + text)
    if not args.no_write:
        replace_section(heading(args.type), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
