"""One AdamW training step on a LLaMA-shaped model (CPU): NeuroAda against its peers and the frozen floor.

Model: transformers LlamaForCausalLM from a config (hidden 1024, intermediate 2752, 8 layers, 16 heads,
vocab 4000; 109.4M parameters, fp32), batch 2 x 128 tokens, AdamW (lr 1e-4, weight_decay 0 for every
method: with decay, the mask-based method would move the entries it masks). Methods:

    floor        all weights frozen, the embedding output requires grad (backward through every layer)
    full         full fine-tuning
    mask1        the paper's Figure 2: dense trainable projections, gradients masked to top-1 per row
    lora8        PEFT LoRA r=8 on q,k,v,o,gate,up,down
    supertuning  PEFT Super-Tuning, sparsity chosen for the same trainable count as top-1 per row
    neuroada1    NeuroAda k=1 (attach(), default mode)
    neuroada20   NeuroAda k=20

Every method runs in its own fresh process (this script re-started with --child), so peak RSS belongs
to that method alone; methods are interleaved over --rounds rounds (order rotated each round) and the
tables show medians over rounds of each process's median step time. Configurations: each thread count
of --threads (default 2, then 1: on a busy 2-core machine two threads mostly wait for each other), and
a diagnostic one (--live-rounds, 0 to skip) with glibc's mmap threshold pinned
(MALLOC_MMAP_THRESHOLD_=131072), so that freed blocks go back to the OS at once and RSS follows the
live tensors instead of what the allocator keeps. A second part trains NeuroAda k=20 for a few hundred
steps on a fixed random bigram language, then checks the saved adapter (validate against the model's
own weights) and merged == unmerged outputs.

    python bench/train.py                  # everything (~55 min on 2 busy shared cores); writes RESULTS.md
    python bench/train.py --rounds 1 --threads 1 --live-rounds 0 --skip-real --no-write
    python bench/train.py --smoke          # tiny model, one child, seconds: keeps the script from rotting
    python bench/train.py --rounds 0 --live-rounds 0 --paired-cycles 0 --skip-real --no-write  # compiled paired only
The paired timings (one process, steps interleaved) run once eagerly and once with every model under torch.compile.

Replaces only the "## Runtime: training step (CPU)" section of bench/RESULTS.md; bench/train_notes.md (profiles
and tries measured by hand, which a rerun does not repeat) goes in under the paired tables each time.
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
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
RAW = os.path.join(HERE, "_work", "train-results.json")
NOTES = os.path.join(HERE, "train_notes.md")  # what was measured by hand between runs; kept under the tables
SECTION = "## Runtime: training step (CPU)"
METHODS = ("floor", "full", "mask1", "lora8", "supertuning", "neuroada1", "neuroada_matched", "neuroada20")
LABELS = {
    "floor": "frozen, backward through activations only (floor)",
    "full": "full fine-tuning",
    "mask1": "mask-based top-1 (dense grads, bool-mask hook)",
    "lora8": "PEFT LoRA r=8",
    "supertuning": "PEFT Super-Tuning (top-abs(W) per matrix, same count as k=1)",
    "neuroada1": "NeuroAda k=1",
    "neuroada_matched": "NeuroAda, k matched to LoRA r=8's count",
    "neuroada20": "NeuroAda k=20",
}
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


@dataclass
class Config:
    """One way of running every method: a thread count and extra environment."""
    label: str
    threads: int
    rounds: int
    env: dict = field(default_factory=dict)
    diagnostic: bool = False


# -- running children -----------------------------------------------------------------------------------
def run_child(jobs: list[str], args, config: Config, steps: int | None = None) -> list[dict]:
    """Start this script as a worker for `jobs`; one JSON record per job, or an {"error"} record."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", ",".join(jobs), args.size, str(args.warmup),
           str(args.steps if steps is None else steps), args.real_size, str(config.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(config.threads), MKL_NUM_THREADS=str(config.threads), **config.env)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"method": j, "error": f"timed out after {args.timeout} s"} for j in jobs]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(records) != len(jobs):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        done = {r["method"] for r in records}
        records += [{"method": j, "error": f"exit {proc.returncode}: {tail}"} for j in jobs if j not in done]
    return records


# -- aggregation ----------------------------------------------------------------------------------------
def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: medians over its processes of step time and memory, plus the spread of step times."""
    out = {}
    for method, recs in runs.items():
        ok = [r for r in recs if "error" not in r]
        if not ok:
            out[method] = {"error": recs[-1]["error"] if recs else "not run"}
            continue
        med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
        steps = [r["median_step_s"] for r in ok]
        out[method] = {
            "trainable": ok[0]["trainable"], "total": ok[0]["total"], "n": len(ok),
            "peak_mb": med("peak_mb"), "rss_build_mb": med("rss_build_mb"),
            "delta_mb": statistics.median(r["peak_mb"] - r["rss_build_mb"] for r in ok),
            "rss_setup_mb": med("rss_setup_mb"), "setup_s": med("setup_s"),
            "peak_steps_mb": (statistics.median(r["peak_steps_mb"] for r in ok)
                              if all(r["peak_steps_mb"] is not None for r in ok) else None),
            "step_s": statistics.median(steps), "step_min": min(steps), "step_max": max(steps),
            "cpu_step_s": med("median_cpu_step_s"),
            "modes": ok[0].get("modes", []), "losses": ok[0]["losses"],
            "errors": [r["error"] for r in recs if "error" in r],
        }
    return out


def verdicts(s: dict[str, dict]) -> list[tuple[str, bool | None, str]]:
    """The bar: (claim, passed or None when unmeasurable, the numbers behind it)."""
    need = ("floor", "lora8", "neuroada1", "neuroada20")
    if any(m not in s or "error" in s[m] for m in need):
        return [("bar", None, "not all of floor, lora8, neuroada1, neuroada20 ran")]
    f, lo, n1, n20 = (s[m] for m in need)
    out = []
    r = n1["peak_mb"] / f["peak_mb"]
    out.append(("NeuroAda k=1 peak RSS <= 1.10x floor", r <= 1.10,
                f"{n1['peak_mb']:.0f} MB = {r:.3f}x floor ({f['peak_mb']:.0f} MB)"))
    out.append(("NeuroAda k=1 peak RSS < LoRA r=8", n1["peak_mb"] < lo["peak_mb"],
                f"{n1['peak_mb']:.0f} MB vs {lo['peak_mb']:.0f} MB"))
    r = n1["step_s"] / f["step_s"]
    out.append(("NeuroAda k=1 step <= 1.2x floor", r <= 1.2,
                f"{n1['step_s']:.3f} s = {r:.3f}x floor ({f['step_s']:.3f} s)"))
    out.append(("NeuroAda k=1 step < LoRA r=8", n1["step_s"] < lo["step_s"],
                f"{n1['step_s']:.3f} s vs {lo['step_s']:.3f} s"))
    r = n20["step_s"] / f["step_s"]
    out.append(("NeuroAda k=20 step <= 1.5x floor", r <= 1.5, f"{n20['step_s']:.3f} s = {r:.3f}x floor"))
    # the goals of issue 14 (no setting where LoRA is the better choice)
    out.append(("goal: NeuroAda k=20 step <= LoRA r=8", n20["step_s"] <= lo["step_s"],
                f"{n20['step_s']:.3f} s vs {lo['step_s']:.3f} s ({n20['step_s'] / lo['step_s']:.3f}x)"))
    out.append(("goal: NeuroAda k=20 step <= 1.25x floor", r <= 1.25, f"{r:.3f}x"))
    r = n1["step_s"] / f["step_s"]
    out.append(("goal: NeuroAda k=1 step <= 1.05x floor", r <= 1.05, f"{r:.3f}x"))
    r = n1["peak_mb"] / f["peak_mb"]
    out.append(("goal: NeuroAda k=1 peak RSS <= 1.05x floor", r <= 1.05, f"{r:.3f}x"))
    if "neuroada_matched" in s and "error" not in s["neuroada_matched"]:
        nm = s["neuroada_matched"]
        out.append(("parameter-matched NeuroAda step <= LoRA r=8", nm["step_s"] <= lo["step_s"],
                    f"k={nm['trainable'] // n1['trainable']}: {nm['trainable']:,} vs {lo['trainable']:,} values; "
                    f"{nm['step_s']:.3f} s vs {lo['step_s']:.3f} s ({nm['step_s'] / lo['step_s']:.3f}x)"))
    return out


# -- output ---------------------------------------------------------------------------------------------
def method_rows(s: dict[str, dict]) -> list[list[str]]:
    floor = s.get("floor", {})
    rows = [["method", "trainable params", "peak RSS MB", "RSS delta over model build MB", "peak during steps MB",
             "median step s (min-max over rounds)", "CPU s per step", "peak / floor", "step / floor"]]
    for m, r in s.items():
        if "error" in r:
            rows.append([LABELS.get(m, m), "-", "-", "-", "-", f"failed: {r['error']}", "-", "-", "-"])
            continue
        ratio = lambda key: f"{r[key] / floor[key]:.2f}x" if key in floor else "-"  # noqa: E731
        steps = "-" if r["peak_steps_mb"] is None else f"{r['peak_steps_mb']:.0f}"
        rows.append([LABELS.get(m, m), f"{r['trainable']:,}", f"{r['peak_mb']:.0f}", f"{round(r['delta_mb'])}", steps,
                     f"{r['step_s']:.3f} ({r['step_min']:.3f}-{r['step_max']:.3f})", f"{r['cpu_step_s']:.3f}",
                     ratio("peak_mb"), ratio("step_s")])
    return rows


def setup_rows(s: dict[str, dict]) -> list[list[str]]:
    rows = [["method", "setup s", "resident after setup - after build MB", "steps' own peak - after setup MB"]]
    for m, r in s.items():
        if "error" in r:
            continue
        own = "-" if r["peak_steps_mb"] is None else f"{round(r['peak_steps_mb'] - r['rss_setup_mb'])}"
        rows.append([LABELS.get(m, m), f"{r['setup_s']:.1f}", f"{round(r['rss_setup_mb'] - r['rss_build_mb'])}", own])
    return rows


def real_lines(real: dict) -> list[str]:
    if "error" in real:
        return [f"Real run failed: {real['error']}"]
    c = real["size"]
    probs = "; ".join(f"{p['rule']} {p['severity']}: {p['message']}" for p in real["problems"]) or "none"
    return [
        f"**Real run** (NeuroAda k=20, same architecture at hidden {c['hidden']}, intermediate {c['inter']}, "
        f"{c['layers']} layers, {c['heads']} heads, vocab {c['vocab']}; {real['trainable']:,} trainable values; "
        f"{c['steps']} AdamW steps, lr {c['lr']} with warm-up and linear decay, batch {c['batch']} x {c['seq']}) "
        f"on a fixed random bigram language (each token followed by its own successor with p=0.8, "
        f"else uniform):",
        "",
        f"- training loss {real['first_loss']:.3f} (mean of the first {real['avg_over']} steps) -> "
        f"{real['last_loss']:.3f} (last {real['avg_over']}); uniform guess {real['uniform_loss']:.3f}, "
        f"entropy floor {real['entropy_floor']:.3f}; held-out batch {real['eval_before']:.3f} -> "
        f"{real['eval_after']:.3f}, and {real['eval_from_file']:.3f} from the saved file (BF16 values) loaded "
        f"onto a fresh copy of the base and merged with merge_and_unload",
        f"- saved adapter ({real['adapter_bytes']:,} bytes): `neuroada_format.validate` against the model's "
        f"state dict as `ArrayBase` with check_selection=True: {'valid' if real['valid'] else 'INVALID'}, "
        f"problems: {probs}",
        f"- merged vs unmerged logits (in-place mode): max abs diff {real['merge_max_abs_diff']:g}; "
        f"unmerge restores the unmerged logits bit for bit: {real['unmerge_exact']}",
        f"- {real['step_ms']:.0f} ms per step on {real['threads']} thread, {real['total_s']:.1f} s in all",
    ]


def verdict_lines(verdict) -> list[str]:
    return [f"- {'PASS' if ok else ('MISS' if ok is False else 'n/a')}: {claim} ({numbers})"
            for claim, ok, numbers in verdict]


def setup_source(results: list[tuple[Config, dict, list]]) -> tuple[Config, dict]:
    """The configuration whose setup figures are shown: 1 thread when measured (least disturbed)."""
    plain = [(c, s) for c, s, _ in results if not c.diagnostic] or [(c, s) for c, s, _ in results]
    return next(((c, s) for c, s in plain if c.threads == 1), plain[0])


def reading_lines(results: list[tuple[Config, dict, list]]) -> list[str]:
    """What the tables say, computed from them (so a re-run on a quiet machine rewrites it)."""
    ok = lambda s, *ms: all(m in s and "error" not in s[m] for m in ms)  # noqa: E731
    plain = [(c, s) for c, s, _ in results if not c.diagnostic]
    live = next((s for c, s, _ in results if c.diagnostic), None)
    one = next((s for c, s in plain if c.threads == 1), None)
    two = next((s for c, s in plain if c.threads == 2), None)
    out = []
    if one and two and ok(one, "floor") and ok(two, "floor"):
        out.append(f"- Time: at 2 threads the floor used {two['floor']['cpu_step_s']:.2f} CPU s per step, at 1 thread "
                   f"{one['floor']['cpu_step_s']:.2f} for the same work. When the 2 cores are busy with other runs, "
                   "each parallel region waits for a second core, so 2-thread wall times are mostly waiting "
                   "(note their min-max spread). The least load-sensitive time here is the 1-thread CPU s per step.")
    if one and ok(one, "floor"):
        f = one["floor"]["cpu_step_s"]
        parts = [f"{LABELS[m]} {one[m]['cpu_step_s'] / f:.2f}x" for m in METHODS if m != "floor" and ok(one, m)]
        out.append("- 1-thread CPU s per step relative to the floor: " + ", ".join(parts) + ".")
    first = one or (plain[0][1] if plain else None)  # same thread count as the diagnostic when measured
    if first and live and ok(first, "floor", "neuroada1") and ok(live, "floor", "neuroada1"):
        lf, ln = live["floor"]["peak_mb"], live["neuroada1"]["peak_mb"]
        line = (f"- Memory (1 thread where measured): with glibc's default allocator NeuroAda k=1 peaks at {first['neuroada1']['peak_mb']:.0f} MB "
                f"({first['neuroada1']['peak_mb'] / first['floor']['peak_mb']:.3f}x the floor); with the mmap "
                f"threshold pinned, where RSS follows live tensors, at {ln:.0f} MB ({ln / lf:.3f}x the floor's "
                f"{lf:.0f} MB)")
        if ok(live, "lora8"):
            line += f"; LoRA r=8 {live['lora8']['peak_mb'] / lf:.3f}x"
        kept = [f"{LABELS[m]} {first[m]['peak_mb'] - live[m]['peak_mb']:.0f} MB" for m in METHODS
                 if ok(first, m) and ok(live, m)]
        line += (". The difference is memory glibc keeps after frees (not live tensors); by method: "
                 + ", ".join(kept) + ".")
        grown = first["neuroada1"]["rss_setup_mb"] - first["neuroada1"]["rss_build_mb"]
        if grown > 50:
            line += (f" NeuroAda's `attach` alone leaves {grown:.0f} MB resident (Setup table: heap kept after the "
                     "top-k selection's full-size temporaries), which its steps then reuse.")
        out.append(line)
    return out


PAIRED = ("floor", "lora8", "neuroada1", "neuroada_matched", "neuroada20")
HOST_SUFFIX = ", tiny shapes (host time)"


def paired_summary(rec: dict) -> dict[str, dict]:
    """Per method: median step, and the median (and quartiles) over cycles of its step / the floor's and
    / LoRA's step in the same cycle."""
    t = rec["times"]
    out = {}
    for m in rec["methods"]:
        row = {"step_s": statistics.median(t[m])}
        for ref in ("floor", "lora8"):
            if ref in t:
                r = [a / b for a, b in zip(t[m], t[ref])]
                q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
                row[ref] = (statistics.median(r), q[0], q[2])
        out[m] = row
    return out


def paired_verdicts(p: dict[str, dict]) -> list[tuple[str, bool | None, str]]:
    """Issue 14's time goals, on the paired ratios."""
    out = []

    def claim(text, m, ref, bar):
        if m in p and ref in p[m]:
            r = p[m][ref][0]
            out.append((text, r <= bar, f"{r:.3f}x"))
    claim("goal: NeuroAda k=20 step <= LoRA r=8", "neuroada20", "lora8", 1.0)
    claim("goal: NeuroAda k=20 step <= 1.25x floor", "neuroada20", "floor", 1.25)
    claim("goal: NeuroAda k=1 step <= 1.05x floor", "neuroada1", "floor", 1.05)
    claim("parameter-matched NeuroAda step <= LoRA r=8", "neuroada_matched", "lora8", 1.0)
    return out


def paired_lines(paired: dict) -> list[str]:
    from results_md import table

    lines = []
    for label, rec in paired.items():
        if "error" in rec:
            lines += ["", f"**Paired, {label}**: not measured ({rec['error']})"]
            continue
        p = paired_summary(rec)
        rows = [["method", "median step s", "step / floor's in the same cycle (median, quartiles)",
                 "step / LoRA r=8's in the same cycle"]]
        for m in rec["methods"]:
            f = p[m].get("floor")
            lo = p[m].get("lora8")
            step = p[m]["step_s"]
            rows.append([LABELS[m], f"{step:.3f}" if step >= 0.1 else f"{step:.4f}",
                         f"{f[0]:.3f}x ({f[1]:.3f}-{f[2]:.3f})" if f else "-", f"{lo[0]:.3f}x" if lo else "-"])
        n = rec["cycles"]
        host = rec.get("size") == "host"  # the goals are about the real shapes: none is judged at these
        lines += ["", f"**Paired, {label}**: {n} cycle{'s' if n != 1 else ''}, every model in one process, one step of "
                  "each per cycle (order rotated):", "", table(rows), "",
                  *(["(Hidden 64, intermediate 172, 8 layers, batch 2 x 16: the same 56 adapted layers as above, "
                     "each a few microseconds of arithmetic.)"] if host else verdict_lines(paired_verdicts(p)))]
    return lines


def section_body(results: list[tuple[Config, dict, list]], real, meta, paired: dict | None = None) -> str:
    from results_md import table  # bench/ is sys.path[0] when run as a script

    lines = [
        f"`python bench/train.py{(' ' + meta['argv']) if meta['argv'] else ''}`; {meta['date']}; "
        f"torch {meta['torch']}; {os.cpu_count()} cores of {meta.get('cpu', 'an unrecorded CPU')} shared with other "
        f"engineers' runs (load average "
        f"{meta['load_start']} at the start, {meta['load_end']} at the end); {meta['wall_s'] / 60:.0f} min in all.",
        "",
        f"LlamaForCausalLM from a config (hidden 1024, intermediate 2752, 8 layers, 16 heads, vocab 4000, "
        f"{meta['total']:,} params, fp32), batch 2 x 128 tokens, one AdamW step (zero_grad, forward with the LM "
        f"loss, backward, step; lr 1e-4, weight_decay 0). Each method in its own fresh process, rounds "
        f"interleaved (order rotated per round), {meta['warmup']} warm-up + {meta['steps']} measured steps per "
        f"process; medians over rounds of each process's median step.",
    ]
    for config, s, verdict in results:
        lines += ["", f"**{config.label}** ({config.rounds} round{'s' if config.rounds > 1 else ''}):", "",
                  table(method_rows(s)), "", "Bar" + (" (diagnostic only)" if config.diagnostic else "") + ":",
                  "", *verdict_lines(verdict)]
    if paired:
        lines += ["", "Paired timing: the tables above give each method its own process (so its memory is its "
                  "own), and a slow spell of this shared machine hits one process and not the next: the same "
                  "2-thread floor measured 0.785 s and 0.900 s in back-to-back processes on 2026-12-02. Below, "
                  "the methods' models live in one process and take one step each in turn, so a spell hits a "
                  "whole cycle; each step is divided by the floor's (and LoRA's) step of its own cycle. The "
                  "tables marked *tiny shapes (host time)* repeat this with the same 56 adapted layers at hidden 64, "
                  "where a step is almost all host time (Python, dispatch, small ops), as a GPU step of small layers "
                  "is: on an H200 NeuroAda k=1 and k=20 took about the same time, both behind LoRA "
                  "(the CUDA section below).",
                  *paired_lines(paired)]
    lines += notes_lines()
    config, s = setup_source(results)
    lines += [
        "",
        f"Setup ({config.label}):",
        "",
        table(setup_rows(s)),
        "",
        "Columns: *peak RSS* = the process's high-water mark over build, setup and steps "
        "(`ru_maxrss`; the kernel mark is reset after setup to read *peak during steps* on its own, and the "
        "earlier peak kept); *RSS delta* = peak minus the resident size right after the model was built "
        "(every child imports the same libraries before building). *CPU s per step* = process CPU time "
        "(all threads) per step, median. *Setup* is the method's own preparation (freezing, wrapping, "
        "selection, optimizer); it is not in the step time.",
        "",
        "Reading the numbers:",
        "",
        *reading_lines(results),
        "",
        "Notes:",
        "",
        "- The floor: every weight frozen and `model.enable_input_require_grads()` (the embedding output "
        "requires grad), so backward runs through every layer down to the input, which any method training "
        "something in layer 0 must do; no optimizer. It is a strict lower bound: with no weight needing a "
        "gradient, autograd keeps fewer tensors (not the projections' inputs) than any method training inside "
        "the projections.",
        f"- Super-Tuning: sparsity {meta.get('supertuning_sparsity', 'n/a')} = 1 - (trainable entries of top-1 "
        "per row) / (entries of the seven projections), so both train about the same number of values (PEFT "
        "rounds per matrix with `int(numel * (1 - sparsity))`).",
        "- mask-based top-1 and NeuroAda k=1 train the same entries: their losses over the steps of one "
        f"process agree to {meta.get('mask_vs_neuroada', 'n/a')} (the comparison is like for like).",
        f"- NeuroAda layers ran in mode(s): {', '.join(meta.get('neuroada_modes', [])) or 'n/a'}.",
        "- The same comparison on CUDA (Triton kernels, bf16 base, 1B-shaped Llama): `bench/gpu.py`, its "
        "section *Runtime: training step (CUDA)*.",
        "",
        *real_lines(real),
    ]
    return "\n".join(lines)


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()


def print_report(results: list[tuple[Config, dict, list]], real, meta) -> None:
    print(f"\ntorch {meta['torch']}, load {meta['load_start']} -> {meta['load_end']}")
    for config, s, verdict in results:
        print(f"\n{config.label}:")
        print_table(method_rows(s))
        print("\n".join(verdict_lines(verdict)))
    print()
    print_table(setup_rows(setup_source(results)[1]))
    if real is not None:
        print("\n".join(real_lines(real)))


# -- main -----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="processes per method and thread count, interleaved")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="measured steps per process")
    ap.add_argument("--threads", default="2,1", help="torch thread counts to measure, comma-separated")
    ap.add_argument("--live-rounds", type=int, default=1,
                    help="rounds of the pinned-mmap-threshold diagnostic (1 thread); 0 skips it")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--paired-cycles", type=int, default=15,
                    help="cycles of the paired timing (every model in one process, steps interleaved) per thread "
                         "count; 0 skips it")
    ap.add_argument("--compiled-cycles", type=int, default=10,
                    help="cycles of the same paired timing with every model under torch.compile (inductor) per thread "
                         "count; 0 skips it (not in --smoke: compiling takes minutes)")
    ap.add_argument("--host-cycles", type=int, default=100,
                    help="cycles of the same paired timing at tiny shapes (hidden 64, 8 layers), where a step is host "
                         "time as a GPU step of small layers is; 0 skips it")
    ap.add_argument("--skip-real", action="store_true", help="skip the real training run")
    ap.add_argument("--real-only", action="store_true", help="only the real training run")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, all methods and a short real run in one child; numbers mean nothing; no write")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per child process")
    ap.add_argument("--from-json", metavar="PATH", help=f"re-render a saved run (e.g. {os.path.relpath(RAW)}); "
                    "measures nothing")
    args = ap.parse_args(argv)
    args.argv = " ".join(argv if argv is not None else sys.argv[1:])
    args.size, args.real_size = ("tiny", "tiny") if args.smoke else ("bench", "real")
    args.configs = [Config(f"{t} thread{'s' if t > 1 else ''} (torch.set_num_threads({t}))", t, args.rounds)
                    for t in (int(x) for x in args.threads.split(",") if x)]
    if args.live_rounds > 0:
        args.configs.append(Config("diagnostic: 1 thread, MALLOC_MMAP_THRESHOLD_=131072 (RSS follows live memory)",
                                   1, args.live_rounds, LIVE_ENV, diagnostic=True))
    if args.smoke:
        # one thread: on a busy machine two threads stall on each other far longer than the work takes
        args.configs = [Config("smoke (tiny model, 1 thread)", 1, 1)]
        args.warmup, args.steps, args.no_write = 1, 1, True
    return args


def collect(args, methods: list[str]) -> tuple[dict, dict | None, dict]:
    """Run the children: {config label: {method: [records]}}, the real-run record, and run facts."""
    started = time.perf_counter()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs: dict[str, dict[str, list[dict]]] = {c.label: {m: [] for m in methods} for c in args.configs}
    real = None
    paired: dict[str, dict] = {}
    if args.smoke:  # one process for everything: the point is to exercise the code, not to measure
        config = args.configs[0]
        pm = [m for m in PAIRED if m in methods]
        extra, labels = [], []
        if "floor" in pm and len(pm) > 1:
            for job, cycles, suffix in (("paired", args.paired_cycles, ""), ("paired-host", args.host_cycles,
                                                                              HOST_SUFFIX)):
                if cycles > 0:
                    extra.append(f"{job}=" + "+".join(pm))
                    labels.append(config.label + suffix)
        for r in run_child(methods + extra + ([] if args.skip_real else ["real"]), args, config):
            if r["method"] == "real":
                real = r
            elif r["method"].startswith("paired"):  # its record, or the error record of its job
                paired[labels.pop(0)] = r
            else:
                runs[config.label][r["method"]].append(r)
    else:
        for rnd in range(max(c.rounds for c in args.configs)):
            for config in args.configs:
                if rnd >= config.rounds:
                    continue
                order = methods[rnd % len(methods):] + methods[:rnd % len(methods)] if methods else []
                for m in order:
                    (rec,) = run_child([m], args, config)
                    runs[config.label][m].append(rec)
                    shown = rec.get("error") or (f"{rec['median_step_s']:.3f} s/step "
                                                 f"(cpu {rec['median_cpu_step_s']:.3f}), peak {rec['peak_mb']:.0f} MB")
                    print(f"round {rnd + 1}  {config.label[:40]:<40}  {m:<12} {shown}", flush=True)
        pm = [m for m in PAIRED if m in methods]
        kinds = (("paired", args.paired_cycles, ""),
                 ("paired-compiled", args.compiled_cycles, ", every model under torch.compile (inductor)"),
                 ("paired-host", args.host_cycles, HOST_SUFFIX))
        for job, cycles, suffix in kinds:
            if cycles <= 0 or "floor" not in pm or len(pm) < 2:
                continue
            for config in args.configs:
                if config.diagnostic:
                    continue
                label = config.label + suffix
                (rec,) = run_child([f"{job}=" + "+".join(pm)], args, config, steps=cycles)
                paired[label] = rec
                print(f"paired  {label[:40]:<40}  " + (rec.get("error") or ", ".join(
                    f"{m} {v['floor'][0]:.3f}x" for m, v in paired_summary(rec).items())), flush=True)
        if not args.skip_real:
            (real,) = run_child(["real"], args, Config("real", 1, 1))
    facts = {"argv": args.argv, "date": datetime.date.today().isoformat(), "cpu": cpu_model(),
             "load_start": load_start,
             "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()), "wall_s": time.perf_counter() - started,
             "warmup": args.warmup, "steps": args.steps, "configs": [asdict(c) for c in args.configs],
             "paired": paired}
    return runs, real, facts


def cpu_model() -> str:
    """The processor's name: the ratios here move with it (a cache miss costs what the memory system says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def notes_lines() -> list[str]:
    """bench/train_notes.md: profiles and tries a rerun does not repeat, kept when the section is rewritten."""
    try:
        with open(NOTES, encoding="utf-8") as f:
            text = f.read().strip("\n")
    except FileNotFoundError:
        return []
    return ["", *text.split("\n")]


def describe(runs: dict, facts: dict) -> dict:
    """Run facts plus what the records say about the run as a whole (versions, cross-checks)."""
    all_recs = [r for per in runs.values() for rs in per.values() for r in rs if "error" not in r]
    first = all_recs[0] if all_recs else {}
    meta = {**facts, "torch": first.get("torch", "?"), "total": first.get("total", 0)}
    st = next((r for r in all_recs if r["method"] == "supertuning"), None)
    if st is not None:
        meta["supertuning_sparsity"] = f"{st['sparsity']:.6f}"
    mask = next((r for r in all_recs if r["method"] == "mask1"), None)
    nada = next((r for r in all_recs if r["method"] == "neuroada1"), None)
    if mask and nada:
        diff = max(abs(x - y) for x, y in zip(mask["losses"], nada["losses"]))
        meta["mask_vs_neuroada"] = f"{diff:.2e} (max abs difference over {len(mask['losses'])} steps)"
    meta["neuroada_modes"] = sorted({mode for r in all_recs for mode in r.get("modes", [])})
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not args.configs:
        print(f"unknown method(s): {', '.join(unknown)}" if unknown else "nothing to run", file=sys.stderr)
        return 2
    if args.real_only:
        methods = []
    if args.from_json:  # re-render a saved run (e.g. after changing the tables), nothing is measured
        with open(args.from_json, encoding="utf-8") as f:
            saved = json.load(f)
        runs, real, facts = saved["runs"], saved["real"], saved["facts"]
        configs = [Config(**c) for c in facts["configs"]]
        methods = sorted({m for per in runs.values() for m in per}, key=METHODS.index)
    else:
        runs, real, facts = collect(args, methods)
        configs = args.configs
        if not args.smoke:
            os.makedirs(os.path.dirname(RAW), exist_ok=True)
            with open(RAW, "w", encoding="utf-8") as f:
                json.dump({"facts": facts, "runs": runs, "real": real}, f, indent=1)
    results = []
    for config in configs:
        s = summarize(runs[config.label])
        results.append((config, s, verdicts(s)))
    meta = describe(runs, facts)
    paired = facts.get("paired") or {}
    print_report(results, real, meta)
    if paired:
        print("\n".join(paired_lines(paired)))
    if not args.no_write and methods:
        from results_md import replace_section  # bench/ is sys.path[0] when run as a script

        replace_section(SECTION, section_body(results, real or {"error": "skipped (--skip-real)"}, meta, paired))
        print(f"\nwrote {SECTION!r} in {RESULTS}")
    failed = sorted({m for _, s, _ in results for m, r in s.items() if r.get("error", "not run") != "not run"})
    failed += [f"paired ({label})" for label, rec in paired.items() if "error" in rec]
    if real is not None and ("error" in real or not (
            real["valid"] and real["unmerge_exact"] and real["merge_max_abs_diff"] == 0)):
        failed.append("real")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, HERE)
        import _train_worker  # noqa: E402  (torch is imported only in children)

        _train_worker.main(sys.argv[2:])
    else:
        sys.exit(main())
