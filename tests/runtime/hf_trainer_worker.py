"""One transformers.Trainer run on a tiny Llama with NeuroAda attached, as its own process.

Used by test_hf_native.py to kill a run with SIGKILL and resume it in a new process:

    python hf_trainer_worker.py OUT [--pause-at STEP] [--resume] [--final DIR] [--log FILE]

--pause-at writes OUT/paused-<STEP> after that optimizer step and then sleeps, so the parent can
`kill -9` it at a known point (after a checkpoint exists, in the middle of training).
Everything is seeded: two runs with the same arguments produce the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers

from neuroada_format.runtime import NeuroAdaConfig, attach

MAX_STEPS = 12
SAVE_STEPS = 3


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512)
    return transformers.LlamaForCausalLM(cfg)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(0, 512, (16,), generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class PauseAt(transformers.TrainerCallback):
    """Stop in the middle of training (after `step`) and wait to be killed."""

    def __init__(self, out: str, step: int):
        self.out, self.step = out, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with open(os.path.join(self.out, f"paused-{self.step}"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)  # the parent sends SIGKILL now


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--pause-at", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--final")
    p.add_argument("--log")
    a = p.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    model = attach(tiny_llama(), NeuroAdaConfig(k=2))
    args = transformers.TrainingArguments(
        output_dir=a.out, max_steps=MAX_STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=3e-2, lr_scheduler_type="linear", warmup_steps=2, report_to=[], use_cpu=True, seed=7,
        data_seed=7, logging_strategy="steps", logging_steps=1, save_strategy="steps", save_steps=SAVE_STEPS,
        save_total_limit=2, eval_strategy="steps", eval_steps=SAVE_STEPS, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", greater_is_better=False,
        gradient_checkpointing=True, dataloader_num_workers=0, disable_tqdm=True)
    callbacks = [PauseAt(a.out, a.pause_at)] if a.pause_at else []
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(96, 1), eval_dataset=Rows(8, 2),
                                   callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    if a.final:
        trainer.save_model(a.final)
    if a.log:
        with open(a.log, "w") as f:
            json.dump({"log_history": trainer.state.log_history,
                       "best_model_checkpoint": trainer.state.best_model_checkpoint,
                       "model_bytes": sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                                          if ".neuroada_" not in k)}, f)


if __name__ == "__main__":
    main()
