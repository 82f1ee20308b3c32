"""bench/train.py's training-step comparison on one CUDA GPU, where NeuroAda runs on the Triton kernels.

    python bench/gpu.py                       # the prepared run: 1B-shaped Llama, bf16 base, 11 processes
    python bench/gpu.py --dtypes bf16,fp32    # and an fp32 base (10 more processes, about twice the time)
    python bench/gpu.py --profile /tmp/prof   # and each method's ops by host and device time (torch.profiler)
    python bench/gpu.py --methods all --size 7b   # every method; LLaMA-7B shape (fp32 full FT needs > 100 GB)
    python bench/gpu.py --cpu-smoke           # no GPU: tiny shapes, Triton interpreter on CPU (the test's run)

First a correctness check (fp32 and bf16 bases, k=20): the Triton kernels against the reference backend
(loss equal, max relative difference of the deltas' gradients), merged == unmerged logits, unmerge
restores logits and weights bit for bit; it prints `check: PASS` or `check: FAIL` (exit 1 on FAIL).
Then each method runs in its own fresh process (this script re-started with --child): memory is the
CUDA caching allocator's `torch.cuda.max_memory_allocated()` (peak over setup and steps, and over the
steps alone after `reset_peak_memory_stats`), time is CUDA events around each full step (zero_grad,
forward, backward, AdamW step), median over the measured steps. NeuroAda methods force the Triton
backend (a broken triton fails loudly instead of falling back), whose deltas' gradient is the dense
product on the tensor cores for a bf16 base from k=2 on, and at k=1 the kernel that reads only the k
sampled columns; "-gather" rows take that kernel at any k, "-dense" rows the product at any k (the
side-by-side for each default); "-torch" rows run on the stock-torch sparse ops; "neuroada_matched"
is the k whose trainable count k * sum(d_out) is nearest PEFT LoRA r=8's (computed from the model: 15
on these shapes). Without CUDA it prints one line and exits 2.

Time on one H200 (2026-12-04, torch 2.11): the check and 7 methods took 114 s on one host (call 148 s
with installs); on a slower host 10-25 s a process, so the check and 6 methods filled a --budget of
190 s. The default 10 methods take about 3-4 minutes on the faster host; --budget (default 285 s)
caps the run anyway: a method that would start after the budget is reported as skipped, and no child
runs past the remaining budget.

Replaces only the "## Runtime: training step (CUDA)" section of bench/RESULTS.md (never in --cpu-smoke).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SECTION = "## Runtime: training step (CUDA)"
SIZES = {
    # hidden, intermediate, layers, heads, vocab, batch, seq
    "tiny": dict(hidden=32, inter=64, layers=2, heads=2, vocab=64, batch=1, seq=8),  # --cpu-smoke
    "bench": dict(hidden=1024, inter=2752, layers=8, heads=16, vocab=4000, batch=2, seq=128),
    "1b": dict(hidden=2048, inter=5632, layers=16, heads=32, vocab=32000, batch=4, seq=512),
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, vocab=32000, batch=2, seq=512),
}
# the correctness check's model: small, so that it also runs under the interpreter
CHECK_SHAPE = {"cuda": dict(hidden=256, inter=688, layers=2, heads=8, vocab=128, batch=2, seq=64),
               "cpu": dict(hidden=32, inter=64, layers=2, heads=2, vocab=64, batch=1, seq=8)}
METHODS = ("floor", "full", "mask1", "lora8", "supertuning", "neuroada1", "neuroada20", "neuroada_matched",
           "neuroada1-dense", "neuroada20-gather", "neuroada1-torch", "neuroada20-torch")
DEFAULT_METHODS = ("floor", "full", "lora8", "neuroada1", "neuroada20", "neuroada_matched", "neuroada1-dense",
                   "neuroada20-gather", "neuroada1-torch", "neuroada20-torch")
LABELS = {
    "floor": "frozen, backward through activations only (floor)",
    "full": "full fine-tuning",
    "mask1": "mask-based top-1 (dense grads, bool-mask hook)",
    "lora8": "PEFT LoRA r=8",
    "supertuning": "PEFT Super-Tuning (same count as k=1)",
    "neuroada1": "NeuroAda k=1 (Triton)",
    "neuroada20": "NeuroAda k=20 (Triton)",
    "neuroada_matched": "NeuroAda k={k} (Triton; LoRA r=8's count)",
    "neuroada1-dense": "NeuroAda k=1 (Triton; gradient by the dense product)",
    "neuroada20-gather": "NeuroAda k=20 (Triton; gradient by the gather kernel)",
    "neuroada1-torch": "NeuroAda k=1 (stock torch sparse ops)",
    "neuroada20-torch": "NeuroAda k=20 (stock torch sparse ops)",
}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# pass bars of the check: the kernels sum in f32 in another order than the reference, nothing more
GRAD_REL_TOL = 1e-4


# -- child side -----------------------------------------------------------------------------------------
def _sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def _peak_mb(dev: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None


def _reset_peak(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()


def write_profile(path: str, run_step, dev: str, steps: int = 3) -> None:
    """torch.profiler over a few more steps: the ops by their own host time, and on CUDA by device time.

    A step whose device work is small is bound by what the host does per layer (Python, dispatch,
    launches); the first table shows that, the second what the GPU spends."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            run_step()
        _sync(dev)
    ka = prof.key_averages()
    parts = [f"{steps} steps; ops by self CPU time", ka.table(sort_by="self_cpu_time_total", row_limit=30)]
    if dev == "cuda":
        parts += ["ops by self device time", ka.table(sort_by="self_device_time_total", row_limit=30)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")


def child_bench(method: str, size: str, dtype_name: str, warmup: int, steps: int, dev: str,
                profile_dir: str = "") -> dict:
    import torch

    import _train_worker as tw
    from neuroada_format.runtime import kernels

    dtype = getattr(torch, DTYPES[dtype_name])
    shape = SIZES[size]
    # "cpu" = the stock-torch sparse paths (they run on CUDA tensors too); NeuroAda otherwise on Triton,
    # forced so that a broken triton raises instead of falling back
    setup, _, variant = method.partition("-")  # "neuroada20-torch" -> the neuroada20 setup, the "torch" variant
    kernels.set_backend("cpu" if variant == "torch" else "triton")
    if variant in ("gather", "dense"):  # the deltas' gradient by the kernel that reads only the k sampled columns,
        from neuroada_format.runtime.kernels import triton as tk  # or by the dense product, whatever k is

        tk.DENSE_ROWDOT = variant == "dense"
    with torch.device(dev):
        model = tw.build_llama(**shape).to(dtype)
    _sync(dev)
    base_mb = torch.cuda.memory_allocated() / 2**20 if dev == "cuda" else None
    _reset_peak(dev)
    extra = {"sparsity": tw.supertuning_sparsity(model)} if method == "supertuning" else {}
    if method == "neuroada_matched":
        extra["k"] = tw.lora_matched_k(model)
    t0 = time.perf_counter()
    model, params = tw.SETUPS[setup](model)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if params else None
    _sync(dev)
    setup_s = time.perf_counter() - t0
    peak_setup = _peak_mb(dev)
    _reset_peak(dev)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen).to(dev)
    times, losses = [], []
    for i in range(warmup + steps):
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = tw.train_step(model, opt, ids)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            loss = tw.train_step(model, opt, ids)
            elapsed = time.perf_counter() - t
        losses.append(loss.item())
        if i >= warmup:
            times.append(elapsed)
    peak_steps = _peak_mb(dev)
    if profile_dir:
        write_profile(os.path.join(profile_dir, f"{method}-{dtype_name}.txt"),
                      lambda: tw.train_step(model, opt, ids), dev)
    modes = sorted({layer.mode for layer in tw._neuroada_layers(model)})
    return {"method": method, "dtype": dtype_name, "trainable": sum(p.numel() for p in params),
            "base_mb": base_mb, "peak_mb": None if dev != "cuda" else max(peak_setup, peak_steps),
            "peak_steps_mb": peak_steps, "setup_s": setup_s, "step_s": times,
            "median_step_s": statistics.median(times), "losses": losses, "modes": modes,
            "backend": kernels.get_backend(), **extra}


def child_check(dev: str) -> list[dict]:
    """Triton vs the reference backend, merge == unmerged, unmerge exact, for fp32 and bf16 bases."""
    import torch

    import _train_worker as tw
    from neuroada_format.runtime import NeuroAdaConfig, attach, kernels, merge, unmerge
    from neuroada_format.runtime.guards import layers

    shape = CHECK_SHAPE[dev]
    out = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with torch.device(dev):
            model = tw.build_llama(**shape).to(dtype)
        attach(model, NeuroAdaConfig(k=20, target_modules=tw.PROJECTIONS))
        gen = torch.Generator(device=dev).manual_seed(3)
        with torch.no_grad():
            for layer in layers(model).values():
                v = layer.neuroada_val["default"]
                v.copy_(torch.randn(v.shape, generator=gen, device=dev) * 0.02)
        vals = [layer.neuroada_val["default"] for layer in layers(model).values()]
        weights = {n: t.clone() for n, t in model.state_dict().items()}
        ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen, device=dev)

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
        with torch.no_grad(), kernels.use_backend("triton"):
            unmerged = model(input_ids=ids).logits
            merge(model)
            merged = model(input_ids=ids).logits
            unmerge(model)
            again = model(input_ids=ids).logits
        exact = all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())
        rec = {"method": "check", "dtype": dtype_name, "loss_equal": bool(torch.equal(l_tri, l_ref)),
               "grad_max_rel_diff": rel, "merge_max_abs_diff": float((merged - unmerged).abs().max()),
               "unmerge_logits_exact": bool(torch.equal(again, unmerged)), "unmerge_weights_exact": exact}
        rec["passed"] = (rec["loss_equal"] and rel <= GRAD_REL_TOL and rec["merge_max_abs_diff"] == 0
                         and rec["unmerge_logits_exact"] and exact)
        out.append(rec)
    return out


def child_main(argv: list[str]) -> None:
    """argv: jobs (comma-separated: "check" and/or methods), size, dtype, warmup, steps, device, profile dir or ""."""
    import torch

    jobs, size, dtype_name, warmup, steps, dev, profile_dir = argv
    sys.path.insert(0, HERE)
    env = {"torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"}
    for job in jobs.split(","):
        try:
            recs = child_check(dev) if job == "check" else \
                [child_bench(job, size, dtype_name, int(warmup), int(steps), dev, profile_dir)]
        except torch.cuda.OutOfMemoryError:
            recs = [{"method": job, "dtype": dtype_name, "error": "CUDA out of memory"}]
        for r in recs:
            print(json.dumps({**env, **r}), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()


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
    return host_problem()


def host_problem() -> str | None:
    """What the GPU run needs besides torch+CUDA+triton, said before any child starts."""
    # what every child imports first: missing, each child failed on its own and the run ended in "check: FAIL"
    for module in ("neuroada_format.runtime", "transformers", "peft", "psutil", "ml_dtypes"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            return f"{module} cannot be imported ({exc})"
    # triton builds its launcher with a C compiler and the Python headers at the first launch
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        return "no C compiler (cc, gcc or clang; or $CC), which triton needs to build its launcher"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"no Python.h under {include!r} (the Python development headers), which triton's launcher needs"
    return None


def run_child(jobs: list[str], dtype_name: str, args, timeout: float) -> list[dict]:
    """Run `jobs` in one fresh process; one record per job (an error record for each job that printed none)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", ",".join(jobs), args.size, dtype_name,
           str(args.warmup), str(args.steps), args.device, args.profile or ""]
    env = dict(os.environ)
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # read when the kernels are imported: must be set before the child starts
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc = exc.stdout or "", f"timed out after {timeout:.0f} s", None
        out = out.decode() if isinstance(out, bytes) else out
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    done = {r["method"] for r in recs}
    tail = (err.strip().splitlines() or ["no output"])[-1] if isinstance(err, str) else "no output"
    why = tail if rc is None else f"exit {rc}: {tail}"
    for job in jobs:
        if job not in done:
            recs.append({"method": job, "dtype": dtype_name, "error": why})
    return recs


def label(method: str, rec: dict) -> str:
    return LABELS[method].format(k=rec.get("k", "?"))


def check_line(c: dict) -> str:
    if "error" in c:
        return f"- check {c['dtype']}: FAIL: {c['error']}"
    return (f"- check ({c['dtype']} base, k=20, Triton vs reference): {'PASS' if c['passed'] else 'FAIL'}; "
            f"loss equal {c['loss_equal']}, grad max rel diff {c['grad_max_rel_diff']:.2e} (bar {GRAD_REL_TOL:g}), "
            f"merged vs unmerged max abs diff {c['merge_max_abs_diff']:g}, unmerge exact (logits "
            f"{c['unmerge_logits_exact']}, weights {c['unmerge_weights_exact']})")


def report(results: dict, checks: list[dict], meta: dict) -> str:
    import results_md

    def cell(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"`{meta['command']}`, {meta['date']}; {meta['gpu']}, torch {meta['torch']}; Llama shape "
             f"{SIZES[meta['size']]}; {meta['warmup']} warm-up + {meta['steps']} measured steps per process, "
             f"{meta['rounds']} round(s); {meta['wall_s']:.0f} s in all.", ""]
    lines += [check_line(c) for c in checks]
    for dtype_name, per in results.items():
        floor, lora = per.get("floor", {}), per.get("lora8", {})
        rows = [["method", "trainable params", "peak MB (max_memory_allocated)", "over the base model MB",
                 "peak during steps MB", "median step ms", "peak / floor", "step / floor", "step / LoRA r=8"]]
        for m, r in per.items():
            if "error" in r:
                rows.append([label(m, r), "-", "-", "-", "-", f"failed: {r['error']}", "-", "-", "-"])
                continue
            fl = floor if floor and "error" not in floor else None
            lo = lora if lora and "error" not in lora else None
            over = None if r["peak_mb"] is None else r["peak_mb"] - r["base_mb"]
            rows.append([label(m, r), f"{r['trainable']:,}", cell(r["peak_mb"], ".0f"), cell(over, ".0f"),
                         cell(r["peak_steps_mb"], ".0f"), f"{r['step_s'] * 1e3:.1f}",
                         f"{r['peak_mb'] / fl['peak_mb']:.2f}x" if fl and r["peak_mb"] else "-",
                         f"{r['step_s'] / fl['step_s']:.2f}x" if fl else "-",
                         f"{r['step_s'] / lo['step_s']:.2f}x" if lo else "-"])
        lines += ["", f"**{dtype_name} base**", "", results_md.table(rows)]
    modes = sorted({mo for per in results.values() for r in per.values() for mo in r.get("modes", [])})
    if modes:
        lines += ["", f"NeuroAda layers ran in mode(s): {', '.join(modes)}."]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp32")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)}, or 'all'")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=180, help="seconds per child process")
    ap.add_argument("--budget", type=int, default=285, help="seconds for the whole run; methods that would "
                    "start later are reported as skipped")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--profile", metavar="DIR", help="also profile 3 more steps of each method (torch.profiler) "
                    "and write DIR/<method>-<dtype>.txt: where the time of a step goes, host and device")
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: tiny shapes, CPU tensors through the Triton "
                    "interpreter (TRITON_INTERPRET=1), every job in one child, memory not measured, never writes")
    args = ap.parse_args(argv)
    args.device = "cpu" if args.cpu_smoke else "cuda"
    if args.cpu_smoke:
        args.size, args.warmup, args.steps, args.rounds, args.no_write = "tiny", 0, 2, 1, True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    methods = list(METHODS) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    bad = [d for d in dtypes if d not in DTYPES] + [m for m in methods if m not in METHODS]
    if bad:
        print(f"bench/gpu.py: unknown dtype/method: {', '.join(bad)}", file=sys.stderr)
        return 2
    if args.profile:
        args.profile = os.path.abspath(args.profile)
        os.makedirs(args.profile, exist_ok=True)
    if not args.cpu_smoke:
        problem = cuda_problem()
        if problem:
            print(f"bench/gpu.py needs a CUDA GPU with triton: {problem}. Nothing was run.", file=sys.stderr)
            return 2
    started = time.perf_counter()

    def left() -> float:
        return args.budget - (time.perf_counter() - started)

    runs: dict[str, dict[str, list]] = {d: {m: [] for m in methods} for d in dtypes}
    if args.cpu_smoke:  # one process for everything: the interpreter run checks code paths, not costs
        checks, runs = [], {d: {m: [] for m in methods} for d in dtypes}
        for d in dtypes:
            recs = run_child(["check"] * (d == dtypes[0]) + methods, d, args, min(args.timeout, left()))
            checks += [r for r in recs if r["method"] == "check"]
            for r in recs:
                if r["method"] != "check":
                    runs[d][r["method"]].append(r)
    else:
        checks = [r for r in run_child(["check"], "fp32", args, min(args.timeout, left()))]
        for rnd in range(args.rounds):
            for d in dtypes:
                order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
                for m in order:
                    if left() < 15:
                        rec = {"method": m, "dtype": d, "error": f"skipped: --budget {args.budget} s spent"}
                    else:
                        (rec,) = run_child([m], d, args, min(args.timeout, left()))[-1:]
                    runs[d][m].append(rec)
                    shown = rec.get("error") or f"{rec['median_step_s'] * 1e3:.1f} ms/step"
                    print(f"round {rnd + 1}  {d}  {m:<17} {shown}", flush=True)
    for c in checks:
        print(check_line(c), flush=True)
    results = {}
    for d, per in runs.items():
        results[d] = {}
        for m, recs in per.items():
            ok = [r for r in recs if "error" not in r]
            if not ok:
                results[d][m] = {"error": recs[-1]["error"] if recs else "not run"}
                continue

            def med(key, ok=ok):
                vals = [r[key] for r in ok]
                return None if None in vals else statistics.median(vals)

            results[d][m] = {"trainable": ok[0]["trainable"], "peak_mb": med("peak_mb"), "base_mb": med("base_mb"),
                             "peak_steps_mb": med("peak_steps_mb"), "step_s": med("median_step_s"),
                             "modes": ok[0]["modes"], **({"k": ok[0]["k"]} if "k" in ok[0] else {})}
    any_rec = next((r for per in runs.values() for rs in per.values() for r in rs if "error" not in r), {})
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"size": args.size, "date": datetime.date.today().isoformat(), "gpu": any_rec.get("gpu", "?"),
            "torch": any_rec.get("torch", "?"), "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
            "wall_s": time.perf_counter() - started, "command": command.strip()}
    sys.path.insert(0, HERE)
    body = report(results, checks, meta)
    print("\n" + body)
    passed = bool(checks) and all(c.get("passed") for c in checks)
    print(f"\ncheck: {'PASS' if passed else 'FAIL'}")
    if not args.no_write:
        import results_md

        results_md.replace_section(SECTION, body)
        print(f"wrote {SECTION!r} in {results_md.RESULTS}")
    return 0 if passed else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        sys.exit(main())
