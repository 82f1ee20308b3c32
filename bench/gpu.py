"""bench/train.py's comparison on one CUDA GPU, where NeuroAda runs on the Triton kernels; bf16 and fp32 bases.

    python bench/gpu.py                       # 1B-shaped Llama, batch 4 x 512, bf16 and fp32: 17 processes
    python bench/gpu.py --size bench --dtypes fp32 --no-write
    python bench/gpu.py --size 7b --dtypes bf16   # LLaMA-7B shape (fp32 full fine-tuning needs > 100 GB)

Each (method, dtype) runs in its own fresh process (this script re-started with --child). Memory is the
CUDA caching allocator's `torch.cuda.max_memory_allocated()` (peak over setup and steps, and over the
steps alone after `reset_peak_memory_stats`), time is CUDA events around each full step (zero_grad,
forward, backward, AdamW step), median over the measured steps. Methods are those of bench/train.py plus
"neuroada20-torch" (NeuroAda k=20 on the stock-torch sparse ops instead of Triton). A correctness check
runs first: on CUDA, Triton vs the reference backend (loss, grads of the deltas), merged == unmerged
outputs, unmerge exact. On a machine without CUDA it prints why and exits with status 2. Written
without a GPU at hand: it has never run on one (run it with --size bench --no-write first).

Replaces only the "## Runtime: training step (CUDA)" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "## Runtime: training step (CUDA)"
SIZES = {
    # hidden, intermediate, layers, heads, vocab, batch, seq
    "bench": dict(hidden=1024, inter=2752, layers=8, heads=16, vocab=4000, batch=2, seq=128),
    "1b": dict(hidden=2048, inter=5632, layers=16, heads=32, vocab=32000, batch=4, seq=512),
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, vocab=32000, batch=2, seq=512),
}
METHODS = ("floor", "full", "mask1", "lora8", "supertuning", "neuroada1", "neuroada20", "neuroada20-torch")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


# -- child side -----------------------------------------------------------------------------------------
def child_bench(method: str, size: str, dtype_name: str, warmup: int, steps: int) -> dict:
    import torch

    import _train_worker as tw
    from neuroada_format.runtime import kernels

    dtype = getattr(torch, DTYPES[dtype_name])
    shape = SIZES[size]
    if method == "neuroada20-torch":
        kernels.set_backend("cpu")  # the stock-torch sparse paths, on CUDA tensors
    with torch.device("cuda"):
        model = tw.build_llama(**shape).to(dtype)
    torch.cuda.synchronize()
    base_mb = torch.cuda.memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    extra = {"sparsity": tw.supertuning_sparsity(model)} if method == "supertuning" else {}
    t0 = time.perf_counter()
    model, params = tw.SETUPS[method.replace("-torch", "")](model)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if params else None
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - t0
    peak_setup = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen).cuda()
    times, losses = [], []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = tw.train_step(model, opt, ids)
        end.record()
        end.synchronize()
        losses.append(loss.item())
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    peak_steps = torch.cuda.max_memory_allocated() / 2**20
    return {"method": method, "dtype": dtype_name, "trainable": sum(p.numel() for p in params),
            "total": sum(p.numel() for p in model.parameters() if not p.requires_grad) + sum(p.numel() for p in params),
            "base_mb": base_mb, "peak_mb": max(peak_setup, peak_steps), "peak_steps_mb": peak_steps,
            "setup_s": setup_s, "step_s": times, "median_step_s": statistics.median(times), "losses": losses,
            "backend": kernels.get_backend(), "gpu": torch.cuda.get_device_name(), **extra}


def child_check() -> list[dict]:
    """Triton vs the reference backend on CUDA, merge == unmerged, unmerge exact, for fp32 and bf16 bases."""
    import torch

    import _train_worker as tw
    from neuroada_format.runtime import NeuroAdaConfig, attach, kernels, merge, unmerge
    from neuroada_format.runtime.model import layers

    out = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with torch.device("cuda"):
            model = tw.build_llama(hidden=256, inter=688, layers=2, heads=8, vocab=128).to(dtype)
        attach(model, NeuroAdaConfig(k=20, target_modules=tw.PROJECTIONS))
        gen = torch.Generator(device="cuda").manual_seed(3)
        with torch.no_grad():
            for layer in layers(model).values():
                v = layer.neuroada_val["default"]
                v.copy_(torch.randn(v.shape, generator=gen, device="cuda") * 0.02)
        vals = [layer.neuroada_val["default"] for layer in layers(model).values()]
        weights = {n: t.clone() for n, t in model.state_dict().items()}
        ids = torch.randint(0, 128, (2, 64), generator=gen, device="cuda")

        def loss_and_grads(backend):
            with kernels.use_backend(backend):
                for v in vals:
                    v.grad = None
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            return loss.detach(), [v.grad.clone() for v in vals]

        l_tri, g_tri = loss_and_grads("triton")
        l_ref, g_ref = loss_and_grads("reference")
        rel = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(g_tri, g_ref))
        model.eval()
        with torch.no_grad():
            unmerged = model(input_ids=ids).logits
            merge(model)
            merged = model(input_ids=ids).logits
            unmerge(model)
            again = model(input_ids=ids).logits
        exact = all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())
        out.append({"method": "check", "dtype": dtype_name, "loss_equal": bool(torch.equal(l_tri, l_ref)),
                    "grad_max_rel_diff": rel, "merge_max_abs_diff": float((merged - unmerged).abs().max()),
                    "unmerge_logits_exact": bool(torch.equal(again, unmerged)), "unmerge_weights_exact": exact})
    return out


def child_main(argv: list[str]) -> None:
    import torch

    job, size, dtype_name, warmup, steps = argv
    sys.path.insert(0, HERE)
    env = {"torch": torch.__version__}
    try:
        recs = child_check() if job == "check" else [child_bench(job, size, dtype_name, int(warmup), int(steps))]
    except torch.cuda.OutOfMemoryError:
        recs = [{"method": job, "dtype": dtype_name, "error": "CUDA out of memory"}]
    for r in recs:
        print(json.dumps({**env, **r}), flush=True)


# -- parent side ----------------------------------------------------------------------------------------
def cuda_problem() -> str | None:
    try:
        import torch
    except ImportError as exc:
        return f"torch cannot be imported ({exc})"
    if not torch.cuda.is_available():
        return f"no CUDA device is available to torch {torch.__version__}"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any broken install
        return f"triton cannot be imported ({exc})"
    return None


def run_child(job: str, dtype_name: str, args) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", job, args.size, dtype_name, str(args.warmup),
           str(args.steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return [{"method": job, "dtype": dtype_name, "error": f"timed out after {args.timeout} s"}]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not recs:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        recs.append({"method": job, "dtype": dtype_name, "error": f"exit {proc.returncode}: {tail}"})
    return recs


def report(results: dict, checks: list[dict], meta: dict) -> str:
    import results_md

    lines = [f"`python bench/gpu.py --size {meta['size']}`, {meta['date']}; {meta['gpu']}, torch {meta['torch']}; "
             f"Llama shape {SIZES[meta['size']]}; {meta['warmup']} warm-up + {meta['steps']} measured steps per "
             f"process, {meta['rounds']} round(s); {meta['wall_s']:.0f} s.", ""]
    for c in checks:
        if "error" in c:
            lines.append(f"- check {c['dtype']}: failed: {c['error']}")
            continue
        lines.append(f"- check ({c['dtype']} base, k=20, Triton vs reference): loss equal {c['loss_equal']}, "
                     f"grad max rel diff {c['grad_max_rel_diff']:.2e}, merged vs unmerged max abs diff "
                     f"{c['merge_max_abs_diff']:g}, unmerge exact (logits {c['unmerge_logits_exact']}, weights "
                     f"{c['unmerge_weights_exact']})")
    for dtype_name, per in results.items():
        floor = per.get("floor", {})
        rows = [["method", "trainable params", "peak MB (max_memory_allocated)", "over the base model MB",
                 "peak during steps MB", "median step ms", "peak / floor", "step / floor"]]
        for m, r in per.items():
            if "error" in r:
                rows.append([m, "-", "-", "-", "-", f"failed: {r['error']}", "-", "-"])
                continue
            ok = floor and "error" not in floor
            rows.append([m, f"{r['trainable']:,}", f"{r['peak_mb']:.0f}", f"{r['peak_mb'] - r['base_mb']:.0f}",
                         f"{r['peak_steps_mb']:.0f}", f"{r['step_s'] * 1e3:.1f}",
                         f"{r['peak_mb'] / floor['peak_mb']:.2f}x" if ok else "-",
                         f"{r['step_s'] / floor['step_s']:.2f}x" if ok else "-"])
        lines += ["", f"**{dtype_name} base**", "", results_md.table(rows)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"bench/gpu.py needs a CUDA GPU with triton: {problem}. Nothing was run.", file=sys.stderr)
        return 2
    dtypes = [d for d in args.dtypes.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    bad = [d for d in dtypes if d not in DTYPES] + [m for m in methods if m not in METHODS]
    if bad:
        print(f"unknown dtype/method: {', '.join(bad)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    checks = run_child("check", "fp32", args)
    for c in checks:
        print(json.dumps(c), flush=True)
    runs: dict[str, dict[str, list]] = {d: {m: [] for m in methods} for d in dtypes}
    for rnd in range(args.rounds):
        for d in dtypes:
            order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
            for m in order:
                (rec,) = run_child(m, d, args)[-1:]
                runs[d][m].append(rec)
                shown = rec.get("error") or f"{rec['median_step_s'] * 1e3:.1f} ms/step, peak {rec['peak_mb']:.0f} MB"
                print(f"round {rnd + 1}  {d}  {m:<17} {shown}", flush=True)
    results = {}
    for d, per in runs.items():
        results[d] = {}
        for m, recs in per.items():
            ok = [r for r in recs if "error" not in r]
            if not ok:
                results[d][m] = {"error": recs[-1]["error"]}
                continue
            med = lambda k: statistics.median(r[k] for r in ok)  # noqa: E731
            results[d][m] = {"trainable": ok[0]["trainable"], "peak_mb": med("peak_mb"), "base_mb": med("base_mb"),
                             "peak_steps_mb": med("peak_steps_mb"), "step_s": med("median_step_s")}
    any_rec = next((r for per in runs.values() for rs in per.values() for r in rs if "error" not in r), {})
    meta = {"size": args.size, "date": datetime.date.today().isoformat(), "gpu": any_rec.get("gpu", "?"),
            "torch": any_rec.get("torch", "?"), "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
            "wall_s": time.perf_counter() - started}
    sys.path.insert(0, HERE)
    body = report(results, checks, meta)
    print("\n" + body)
    if not args.no_write:
        import results_md

        results_md.replace_section(SECTION, body)
        print(f"\nwrote {SECTION!r} in {results_md.RESULTS}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        sys.exit(main())
