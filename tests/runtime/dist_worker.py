"""One rank of test_distributed.py: train a tiny Llama's deltas on half the global batch under DDP or
FSDP2 (CPU, gloo), then save the gathered adapter (rank 0 writes) and a JSON report of what ran.

Run as `python dist_worker.py {ddp,fsdp,fsdp1} OUT_DIR` with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.
The test imports build_model / global_batch / train from here for its single-process reference.
"""

from __future__ import annotations

import json
import os
import sys

import torch

STEPS = 3
LR = 0.5


def build_model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg)


def config():
    from neuroada_format.runtime import NeuroAdaConfig

    return NeuroAdaConfig(k=2)  # mode="auto"


def global_batch():
    """4 sequences of equal length: the mean loss over all tokens is the mean of the two ranks' means."""
    return torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1))


def train(model, ids, steps=STEPS):
    """SGD keeps the deltas linear in the gradients, so tiny reduction-order differences stay tiny."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main(kind: str, out: str) -> None:
    import torch.distributed as dist

    from neuroada_format import NeuroAdaError
    from neuroada_format.runtime import attach, merge, save_adapter
    from neuroada_format.runtime.guards import layers

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if kind == "fsdp1":
        fsdp1(out, rank)
        return
    model = attach(build_model(), config())  # before any wrapping or sharding
    report = {"modes_at_attach": sorted({l.mode for l in layers(model).values()})}
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
        report["sharded"] = sorted({type(l.base_layer.weight).__name__ for l in layers(model).values()}
                                   | {type(l.neuroada_val["default"]).__name__ for l in layers(model).values()})
    mine = global_batch().chunk(world)[rank]
    report["losses"] = train(wrapped, mine)
    report["modes"] = sorted({l.mode for l in layers(model).values()})
    if kind == "fsdp":
        for what, call in (("merge", lambda: merge(model)), ("attach", lambda: attach(model, config(), "again"))):
            try:
                call()
                report[what + "_refused"] = False
            except NeuroAdaError as exc:
                report[what + "_refused"] = str(exc)
    # every rank takes part (FSDP2 gathers the sharded deltas); rank 0 writes
    save_adapter(model, os.path.join(out, "adapter.safetensors"), value_dtype="F32", is_main_process=rank == 0)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def fsdp1(out: str, rank: int) -> None:
    """FSDP1 flattens deltas and base weights together: every NeuroAda entry point refuses it with one
    error that names FSDP2, and nothing is written."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from neuroada_format import NeuroAdaUsageError
    from neuroada_format.runtime import attach, save_adapter

    report = {}
    model = attach(build_model(), config())
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    late = build_model()
    FullyShardedDataParallel(late, use_orig_params=True, device_id=torch.device("cpu"))
    calls = (("forward", lambda: wrapped(input_ids=global_batch())),
             ("save", lambda: save_adapter(model, os.path.join(out, "adapter.safetensors"))),
             ("attach_after", lambda: attach(late, config())))
    for what, call in calls:
        try:
            call()
            report[what] = None
        except NeuroAdaUsageError as exc:
            report[what] = str(exc)
    report["written"] = sorted(os.listdir(out))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
