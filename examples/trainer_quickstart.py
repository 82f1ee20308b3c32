"""Fine-tune SmolLM2-135M-Instruct with NeuroAda and transformers.Trainer, save, reload, check.

    python examples/trainer_quickstart.py --out /tmp/runs/quick            # SmolLM2 (from the GGUF, cached)
    python examples/trainer_quickstart.py --out /tmp/runs/quick --resume   # continue from the last checkpoint
    python examples/trainer_quickstart.py --out /tmp/q --tiny --quick      # a tiny random Llama, seconds

What it shows: `attach` makes only the sparse deltas trainable; Trainer's checkpoints (`checkpoint-N/`)
and `save_model` hold the adapter (`neuroada_model.safetensors`, loadable with `load_adapter`) plus the
exact trainable state Trainer resumes from (`model.safetensors`), adapter-sized, never the base model.
The reload check loads the saved adapter onto a fresh base and compares logits with the trained model.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import transformers

from neuroada_format.runtime import NeuroAdaConfig, attach, load_adapter, print_trainable_parameters

HERE = Path(__file__).resolve().parent

FACTS = [
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("What do bees make?", "Bees make honey."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which animal is the largest mammal?", "The blue whale is the largest mammal."),
]


class ByteTokenizer:
    """For --tiny: bytes as tokens (vocab 256 + pad), so the example needs no tokenizer files."""

    pad_token_id = 256

    def __call__(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def load_base(tiny: bool, cache: str | None):
    """(model, encode, pad_id): SmolLM2 from the local GGUF-derived cache, or a tiny seeded Llama."""
    if tiny:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=257)
        tok = ByteTokenizer()
        return transformers.LlamaForCausalLM(cfg).eval(), tok, tok.pad_token_id
    sys.path.insert(0, str(HERE))
    import smollm2

    model, tokenizer = smollm2.load(cache, verbose=True)
    return model, (lambda text: tokenizer(text)["input_ids"]), tokenizer.pad_token_id


class Examples(torch.utils.data.Dataset):
    def __init__(self, encode, repeat: int):
        self.rows = [torch.tensor(encode(f"Question: {q}\nAnswer: {a}")) for q, a in FACTS] * repeat

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def collate(pad_id: int):
    def pad(batch):
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, :len(b["input_ids"])] = b["input_ids"]
            mask[i, :len(b["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return pad


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (checkpoints and final adapter)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (for tests)")
    p.add_argument("--quick", action="store_true", help="a few steps only")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("-k", type=int, default=None, help="deltas per output neuron (paper: 1 or 20; default 20, "
                   "2 with --tiny)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--cache", default=None, help="SmolLM2 safetensors cache folder (see examples/smollm2.py)")
    a = p.parse_args(argv)
    steps = a.steps or (4 if a.quick else 60)

    model, encode, pad_id = load_base(a.tiny, a.cache)
    attach(model, NeuroAdaConfig(k=a.k or (2 if a.tiny else 20), target_modules="all-linear"))
    print_trainable_parameters(model)
    args = transformers.TrainingArguments(
        output_dir=a.out, max_steps=steps, per_device_train_batch_size=4, learning_rate=a.lr,
        lr_scheduler_type="linear", warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 10),
        save_steps=max(2, steps // 3), save_total_limit=2, report_to=[], use_cpu=not torch.cuda.is_available(),
        seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Examples(encode, repeat=4),
                                   data_collator=collate(pad_id))
    result = trainer.train(resume_from_checkpoint=True if a.resume else None)
    final = os.path.join(a.out, "final")
    trainer.save_model(final)  # neuroada_config.json + neuroada_model.safetensors (+ model.safetensors)

    # reload check: the saved adapter on a fresh base behaves like the trained model
    fresh, _, _ = load_base(a.tiny, a.cache)
    load_adapter(fresh, final)
    model.eval()
    batch = collate(pad_id)([Examples(encode, 1)[i] for i in range(2)])
    with torch.no_grad():
        got = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    sizes = {f: os.path.getsize(os.path.join(final, f)) for f in sorted(os.listdir(final))
             if f.endswith(".safetensors")}
    base_bytes = sum(t.numel() * t.element_size() for n, t in fresh.named_parameters() if ".neuroada_" not in n)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    last = f"last logged loss {logged[-1]:.4f}, " if logged else ""
    print(f"trained {trainer.state.global_step} steps, {last}mean training loss of this run "
          f"{result.training_loss:.4f}")
    print(f"saved {final}: " + ", ".join(f"{f} {n / 1e6:.2f} MB" for f, n in sizes.items())
          + f" (base model {base_bytes / 1e6:.1f} MB)")
    print(f"reloaded with load_adapter: max |logit diff| {diff:.2e} of max |logit| {scale:.1f} "
          "(the file stores BF16 deltas)")
    if not diff <= 1e-2 * max(scale, 1.0):
        raise SystemExit(f"reload check failed: logits differ by {diff}")
    return {"final": final, "steps": trainer.state.global_step, "diff": diff, "sizes": sizes,
            "base_bytes": base_bytes, "loss": result.training_loss}


if __name__ == "__main__":
    main()
