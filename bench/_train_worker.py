"""The measured side of bench/train.py: runs inside a child process, prints one JSON line per job.

Each job builds the model from scratch, so a process that runs one method sees only that method's
memory. The parent (bench/train.py) never imports torch; it only starts these children and tabulates.
"""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time

import psutil
import torch

# every child imports every library up front, so all methods start from the same resident baseline
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import neuroada_format as naf
from neuroada_format.runtime import (NeuroAdaConfig, NeuroAdaLayer, attach, load_adapter, merge, merge_and_unload,
                                     save_adapter, unmerge)
from neuroada_format.runtime.guards import to_numpy

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# model sizes: (hidden, intermediate, layers, heads, vocab, batch, seq)
SIZES = {
    "bench": dict(hidden=1024, inter=2752, layers=8, heads=16, vocab=4000, batch=2, seq=128),
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, vocab=100, batch=2, seq=16),
    # the bench model's 56 adapted layers at shapes where a step is host time (Python, dispatch, small ops): what a
    # GPU step of small layers waits on, measurable without a GPU
    "host": dict(hidden=64, inter=172, layers=8, heads=4, vocab=100, batch=2, seq=16),
}
REAL_SIZES = {
    "real": dict(hidden=256, inter=688, layers=4, heads=8, vocab=128, batch=16, seq=64, steps=300, lr=1e-2),
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, vocab=32, batch=8, seq=16, steps=20, lr=1e-2),
}


def mb(nbytes: float) -> float:
    return nbytes / 2**20


def rss_mb() -> float:
    return mb(psutil.Process().memory_info().rss)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark so the steps' own peak can be read apart from setup's.
    This also lowers ru_maxrss, so callers must keep the earlier peak themselves."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_llama(hidden, inter, layers, heads, vocab, seed=0, **_):
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=512, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


# -- methods: each freezes/wraps the model and returns (model, the parameters AdamW updates) -------------
def setup_floor(model):
    """All weights frozen; the embedding output requires grad, so backward runs through every layer
    down to the input, as it must for any method that trains something in layer 0. No optimizer.
    A strict lower bound: with no weight needing a gradient, autograd does not even keep the
    projections' inputs, which any method training inside those projections must keep."""
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model, []


def setup_full(model):
    model.requires_grad_(True)
    return model, list(model.parameters())


def setup_mask(model, k=1):
    """The paper's Figure 2: dense trainable projection weights, gradients zeroed off the top-k
    positions per row by a bool mask in a hook; AdamW keeps dense state for the whole matrices."""
    model.requires_grad_(False)
    params = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            w = module.weight
            top = w.detach().abs().topk(k, dim=1).indices
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, top, True)
            w.requires_grad_(True)
            w.register_hook(lambda g, m=mask: g * m)
            params.append(w)
    return model, params


def setup_lora(model, r=8):
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=PROJECTIONS))
    return model, [p for p in model.parameters() if p.requires_grad]


def supertuning_sparsity(model, k=1) -> float:
    """The sparsity giving Super-Tuning (global top-|W| per matrix) the same number of trainable entries as
    NeuroAda top-k over the seven projections: 1 - sum(d_out * k) / sum(d_out * d_in)."""
    rows = cells = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            rows += module.weight.shape[0] * k
            cells += module.weight.numel()
    return 1.0 - rows / cells


def setup_supertuning(model):
    # imported here: a peft without Super-Tuning (older images, bench/gpu.py's machine) fails this method only
    from peft import SupertuningConfig

    cfg = SupertuningConfig(sparsity=supertuning_sparsity(model), target_modules=PROJECTIONS)
    model = get_peft_model(model, cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def setup_neuroada(model, k):
    attach(model, NeuroAdaConfig(k=k, target_modules=PROJECTIONS))
    return model, [p for p in model.parameters() if p.requires_grad]


def lora_matched_k(model, r=8) -> int:
    """The NeuroAda k whose count k * sum(d_out) is nearest PEFT LoRA r's r * sum(d_in + d_out) over the
    seven projections: the parameter-matched comparison (about 15 on Llama shapes with intermediate ~2.7x hidden)."""
    rows = both = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            d_out, d_in = module.weight.shape
            rows, both = rows + d_out, both + d_out + d_in
    return max(1, round(r * both / rows))


SETUPS = {
    "floor": setup_floor,
    "full": setup_full,
    "mask1": lambda m: setup_mask(m, 1),
    "lora8": lambda m: setup_lora(m, 8),
    "supertuning": setup_supertuning,
    "neuroada1": lambda m: setup_neuroada(m, 1),
    "neuroada20": lambda m: setup_neuroada(m, 20),
    "neuroada_matched": lambda m: setup_neuroada(m, lora_matched_k(m)),  # LoRA r=8's trainable count
}


def train_step(model, opt, ids):
    """The measured step (also bench/gpu.py's): zero_grad, forward with the LM loss, backward, AdamW step."""
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if opt is not None:
        opt.step()
    return loss


def bench_method(method: str, size: str, warmup: int, steps: int) -> dict:
    """Build, set up `method`, run warm-up + measured AdamW steps; memory and times of this process."""
    shape = SIZES[size]
    t0 = time.perf_counter()
    model = build_llama(**shape)
    build_s = time.perf_counter() - t0
    gc.collect()
    build = {"rss_build_mb": rss_mb(), "peak_build_mb": peak_rss_mb(), "build_s": build_s}
    total = sum(p.numel() for p in model.parameters())
    extra = {"sparsity": supertuning_sparsity(model)} if method == "supertuning" else {}
    t0 = time.perf_counter()
    model, params = SETUPS[method](model)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if params else None
    trainable = sum(p.numel() for p in params)
    setup_s = time.perf_counter() - t0
    gc.collect()
    setup = {"setup_s": setup_s, "rss_setup_mb": rss_mb(), "peak_setup_mb": peak_rss_mb()}
    modes = sorted({layer.mode for layer in _neuroada_layers(model)})
    steps_only = reset_peak_rss()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen)
    times, cpu_times, losses = [], [], []
    for i in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = train_step(model, opt, ids)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        losses.append(loss.item())
        if i >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    end = peak_rss_mb()
    return {"method": method, "trainable": trainable, "total": total, **build, **setup, **extra,
            "peak_mb": max(setup["peak_setup_mb"], end), "peak_steps_mb": end if steps_only else None,
            "step_s": times, "median_step_s": statistics.median(times), "cpu_step_s": cpu_times,
            "median_cpu_step_s": statistics.median(cpu_times), "losses": losses, "modes": modes}


def bench_paired(methods: list[str], size: str, warmup: int, cycles: int, compiled: bool = False) -> dict:
    """Every method's model in this one process, one step of each in turn per cycle (order rotated). A slow
    spell on the shared machine then hits every method of a cycle alike and the per-cycle ratios cancel it,
    where separate processes each meet their own spells. Times only: the models share one heap.
    ``compiled``: each model runs through ``torch.compile`` (inductor, default settings); the warm-up compiles."""
    shape = SIZES[size]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen)
    runs = {}
    for method in methods:
        model, params = SETUPS[method](build_llama(**shape))
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if params else None
        if compiled:
            model = torch.compile(model)
        for _ in range(max(warmup, 2 if compiled else 0)):
            train_step(model, opt, ids)
        runs[method] = (model, opt)
    times = {m: [] for m in methods}
    for c in range(cycles):
        for method in methods[c % len(methods):] + methods[:c % len(methods)]:
            model, opt = runs[method]
            start = time.perf_counter()
            train_step(model, opt, ids)
            times[method].append(time.perf_counter() - start)
    return {"method": "paired", "methods": methods, "cycles": cycles, "times": times, "compiled": compiled,
            "size": size}


def _neuroada_layers(model):
    return [m for m in model.modules() if isinstance(m, NeuroAdaLayer)]


# -- the real run: NeuroAda k=20 learns a fixed random bigram language -----------------------------------
def bigram_table(vocab: int, p_follow: float, seed: int):
    """Each token is followed by its fixed successor perm[t] with probability p_follow, else by a uniform token."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    probs = torch.full((vocab, vocab), (1 - p_follow) / vocab)
    probs[torch.arange(vocab), perm] += p_follow
    entropy = float(-(probs * probs.log()).sum(1).mean())
    return probs, entropy


def sample_bigram(probs, batch: int, seq: int, gen) -> torch.Tensor:
    v = probs.shape[0]
    out = torch.empty(batch, seq, dtype=torch.long)
    out[:, 0] = torch.randint(0, v, (batch,), generator=gen)
    for t in range(1, seq):
        out[:, t] = torch.multinomial(probs[out[:, t - 1]], 1, generator=gen).squeeze(1)
    return out


def base_arrays(model) -> dict:
    """The model's base weights under their original names, as numpy (what a checkpoint would hold)."""
    return {name.replace(".base_layer", ""): to_numpy(t) for name, t in model.state_dict().items()
            if ".neuroada_" not in name}


def real_run(size: str) -> dict:
    cfg = REAL_SIZES[size]
    t_start = time.perf_counter()
    probs, entropy = bigram_table(cfg["vocab"], 0.8, seed=7)
    gen = torch.Generator().manual_seed(11)
    eval_ids = sample_bigram(probs, cfg["batch"], cfg["seq"], gen)
    model = build_llama(**cfg)
    attach(model, NeuroAdaConfig(k=20, target_modules=PROJECTIONS))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / cfg["steps"]))

    def eval_loss(m):
        m.eval()
        with torch.no_grad():
            out = m(input_ids=eval_ids, labels=eval_ids)
        m.train()
        return out.loss.item(), out.logits

    eval_before, _ = eval_loss(model)
    losses = []
    model.train()
    t_train = time.perf_counter()
    for _ in range(cfg["steps"]):
        ids = sample_bigram(probs, cfg["batch"], cfg["seq"], gen)
        loss = train_step(model, opt, ids)
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t_train
    eval_after, logits_unmerged = eval_loss(model)

    with tempfile.TemporaryDirectory(prefix="neuroada-bench-train-") as tmp:
        file = save_adapter(model, os.path.join(tmp, "adapter"))
        report = naf.validate(file, base=naf.ArrayBase(base_arrays(model)), check_selection=True)
        size_bytes = os.path.getsize(file)
        merge(model)
        _, logits_merged = eval_loss(model)
        unmerge(model)
        _, logits_after_unmerge = eval_loss(model)
        # the file (values saved as BF16) applied to a freshly built copy of the base
        fresh = build_llama(**cfg)
        load_adapter(fresh, os.path.dirname(file))
        eval_from_file, _ = eval_loss(merge_and_unload(fresh))

    n = max(1, min(10, len(losses) // 5))
    return {
        "method": "real", "size": cfg, "trainable": trainable, "entropy_floor": entropy,
        "first_loss": statistics.fmean(losses[:n]), "last_loss": statistics.fmean(losses[-n:]),
        "first_step_loss": losses[0], "last_step_loss": losses[-1], "avg_over": n,
        "eval_before": eval_before, "eval_after": eval_after, "eval_from_file": eval_from_file,
        "uniform_loss": math.log(cfg["vocab"]), "train_s": train_s,
        "step_ms": 1e3 * train_s / cfg["steps"], "total_s": time.perf_counter() - t_start,
        "valid": report.ok, "problems": report.problems, "adapter_bytes": size_bytes,
        "merge_max_abs_diff": float((logits_merged - logits_unmerged).abs().max()),
        "unmerge_exact": bool(torch.equal(logits_after_unmerge, logits_unmerged)),
    }


def main(argv: list[str]) -> None:
    """argv: jobs (comma-separated method names, "real" and/or "paired=a+b+...", "paired-compiled=a+b+...",
    "paired-host=a+b+..." (at SIZES["host"])), size, warmup, steps (cycles for a paired job), real size, threads."""
    jobs, size, warmup, steps, real_size, threads = argv
    env = {"torch": torch.__version__, "threads": int(threads)}
    for job in jobs.split(","):
        if job.startswith(("paired=", "paired-compiled=", "paired-host=")):  # paired=floor+lora8+...: steps
            torch.set_num_threads(int(threads))                                 # interleaved in one process
            kind, names = job.split("=", 1)
            result = {**env, **bench_paired(names.split("+"), "host" if kind == "paired-host" else size, int(warmup),
                                            int(steps), compiled=kind == "paired-compiled")}
        elif job == "real":
            # a correctness run, not a timing: one thread cannot stall on a descheduled sibling
            torch.set_num_threads(1)
            result = {**env, "threads": 1, **real_run(real_size)}
        else:
            torch.set_num_threads(int(threads))
            result = {**env, **bench_method(job, size, int(warmup), int(steps))}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
