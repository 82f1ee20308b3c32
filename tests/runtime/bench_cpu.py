"""CPU timings of the runtime paths for one 2752x1024 layer (Llama-shaped MLP), 256 tokens.

Not a test (name): run ``python tests/runtime/bench_cpu.py``. Median of 5 after one warm-up, in ms.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from neuroada_format.runtime import NeuroAdaLayer
from neuroada_format.runtime.kernels import Pattern, cpu, reference

D_OUT, D_IN, T = 2752, 1024, 256


def median_ms(fn, n=5):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, layer {D_OUT}x{D_IN}, T={T}")
    W = torch.randn(D_OUT, D_IN) * 0.02
    x = torch.randn(T, D_IN)
    gy = torch.randn(T, D_OUT)
    rows = {}
    rows["dense GEMM fwd  x @ W^T"] = median_ms(lambda: F.linear(x, W))
    rows["dense GEMM bwd  gy @ W (grad_x)"] = median_ms(lambda: gy @ W)
    rows["dense GEMM      gy^T @ x (dense dW)"] = median_ms(lambda: gy.t() @ x)

    def step(layer_fn, params):
        xx = x.clone().requires_grad_(True)

        def run():
            for p in params:
                p.grad = None
            xx.grad = None
            layer_fn(xx).backward(gy)
        return run

    frozen = nn.Linear(D_IN, D_OUT, bias=False)
    with torch.no_grad():
        frozen.weight.copy_(W)
    frozen.requires_grad_(False)
    rows["step fwd+bwd  frozen linear (floor)"] = median_ms(step(frozen, []))
    full = nn.Linear(D_IN, D_OUT, bias=False)
    with torch.no_grad():
        full.weight.copy_(W)
    rows["step fwd+bwd  dense W trainable (mask-based)"] = median_ms(step(full, [full.weight]))

    for k in (1, 20):
        idx = torch.rand(D_OUT, D_IN).topk(k, 1).indices.sort(1).values
        p = Pattern(idx, D_IN)
        val = torch.randn(D_OUT, k) * 1e-3
        w0 = W.gather(1, idx)
        Wk = W.clone()
        p.flat, p.csc  # build the cached structures once, as a layer does
        rows[f"k={k:<2} scatter_ + restore_"] = median_ms(lambda: (cpu.scatter_(Wk, p, w0, val), cpu.restore_(Wk, p, w0)))
        rows[f"k={k:<2} sampled_rowdot  cpu (sampled_addmm)"] = median_ms(lambda: cpu.sampled_rowdot(gy, x, p))
        rows[f"k={k:<2} sampled_rowdot  reference (dense+gather)"] = median_ms(lambda: reference.sampled_rowdot(gy, x, p))
        rows[f"k={k:<2} gather_matvec   S(x) cpu (CSR spmm)"] = median_ms(lambda: cpu.gather_matvec(x, p, val))
        rows[f"k={k:<2} gather_matvec_t S^T(gy) cpu (CSC spmm)"] = median_ms(lambda: cpu.gather_matvec_t(gy, p, val))

        def chunked():
            out = torch.empty(T, D_OUT)
            for s in range(0, T, 32):
                out[s:s + 32] = (x[s:s + 32][:, idx] * val).sum(-1)
            return out
        rows[f"k={k:<2} S(x) alt: x[:, idx] gathered, 32-token chunks"] = median_ms(chunked)
        for mode in ("inplace", "additive"):
            lin = nn.Linear(D_IN, D_OUT, bias=False)
            with torch.no_grad():
                lin.weight.copy_(W)
            layer = NeuroAdaLayer(lin, mode=mode)
            layer.add_adapter("default", idx)
            rows[f"k={k:<2} step fwd+bwd  NeuroAdaLayer {mode}"] = median_ms(
                step(layer, [layer.neuroada_val["default"]]))
    w = max(len(k) for k in rows)
    for name, ms in rows.items():
        print(f"{name:<{w}}  {ms:8.2f} ms")


if __name__ == "__main__":
    main()
