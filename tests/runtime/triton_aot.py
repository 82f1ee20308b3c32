"""Compile every Triton kernel for real GPU targets (sm_90, sm_80) ahead of time, with no GPU: run as a child of
test_triton_compile.py, without TRITON_INTERPRET (which is read when the kernels are imported).

The interpreter the suite runs the kernels in accepts what the compiler refuses (non-power-of-two ranges, mixed
dtypes, some casts), and the CUDA half of the project is first run as one prepared command on a lent GPU: a kernel
that does not compile would waste it. The launches are the runtime's own (its launch code called with CPU tensors,
each kernel swapped for a recorder), bound by Triton's own binder, so the signatures, constants and alignment
hints are those a real launch would compile; triton.compile then goes through ptxas (bundled with the wheel).
Each kernel's TTIR is also read for strides multiplied in 32 bits (``narrow_strides``). Prints one line per
compilation and exits 1 if any failed.
"""
from __future__ import annotations

import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from neuroada_format.runtime.kernels import bgmv  # noqa: E402
from neuroada_format.runtime.kernels import triton as tk  # noqa: E402
from neuroada_format.runtime.kernels.pattern import Pattern  # noqa: E402

LAUNCHES = []  # (kernel, args, kwargs, label)


class _Recorder:
    """Stands for a @triton.jit kernel: ``kernel[grid](*args)`` records the launch instead of running it."""

    def __init__(self, fn, label):
        self.fn, self.label = fn, label

    def __getitem__(self, grid):
        return lambda *args, **kwargs: LAUNCHES.append((self.fn, args, kwargs, self.label[0]))


def capture() -> None:
    label = [""]
    for name in ("_store_bits_kernel", "_add_kernel", "_rowdot_kernel", "_gather_kernel", "_segment_kernel"):
        setattr(tk, name, _Recorder(getattr(tk, name), label))
    assert bgmv.triton_available()  # decorates bgmv's kernel (it does so on first use)
    bgmv._jit = _Recorder(bgmv._jit, label)
    tk.INTERPRET = True  # the launch code's CPU-tensor check; the kernels themselves are the real JITFunctions
    g = torch.Generator().manual_seed(0)

    def pattern(d_out, d_in, k, transposed=False):
        idx = torch.stack([torch.randperm(d_in, generator=g)[:k].sort().values for _ in range(d_out)])
        return Pattern(idx, d_in, transposed=transposed)

    d_out, d_in, T = 48, 40, 37  # not multiples of the blocks
    for k in (1, 20):
        p = pattern(d_out, d_in, k)
        for wd in (torch.bfloat16, torch.float16, torch.float32):
            label[0] = f"k={k} {wd}"
            W = torch.randn(d_out, d_in).to(wd)
            tk.scatter_(W, p, torch.randn(d_out, k).to(wd), torch.randn(d_out, k))
            tk.restore_(W, p, torch.randn(d_out, k).to(wd))
            tk.scatter_(torch.randn(d_in, d_out).to(wd), pattern(d_out, d_in, k, True), torch.randn(d_out, k).to(wd),
                        torch.randn(d_out, k))
            x, gy = torch.randn(T, d_in).to(wd), torch.randn(T, d_out).to(wd)
            tk.sampled_rowdot(gy, x, p)
            tk.sampled_rowdot(gy, x, p, token_spans=3)
            tk.sampled_rowdot(gy.t().contiguous().t(), x, p)  # a column-major grad_y
            tk.gather_matvec(x, p, torch.randn(d_out, k))
            tk.gather_matvec_t(gy, p, torch.randn(d_out, k), d_in)
        for ks in ((k, k), (4, k)):  # one stack of positions shared, and two of their own
            idxs = [pattern(d_out, d_in, kk).idx for kk in ks]
            stack = bgmv.AdapterStack(idxs, [torch.randn(d_out, kk) for kk in ks], d_in)
            for xd in (torch.bfloat16, torch.float32):
                label[0] = f"bgmv ks={ks} {xd}"
                x, y = torch.randn(3 * 7, d_in).to(xd), torch.randn(3 * 7, d_out).to(xd)
                os.environ["TRITON_INTERPRET"] = "1"  # (bgmv's own CPU-tensor check reads it at the call)
                try:
                    bgmv.bgmv_add_triton_(y, x, torch.tensor([0, -1, len(ks) - 1]), stack, seq_len=7)
                    y_cm = torch.randn(d_out, 3 * 7).to(xd).t()  # a column-major y: r x its row stride
                    bgmv.bgmv_add_triton_(y_cm, x, torch.tensor([0, -1, len(ks) - 1]), stack, seq_len=7)
                finally:
                    os.environ.pop("TRITON_INTERPRET", None)


# Strides multiplied in 32 bits on purpose: the row strides of one adapter's own [d_out, k] idx and val (r * k stays
# below d_out * d_in). Every other stride multiplies a token or row number in 64 bits: an activation passes 2^31
# elements past ~195k tokens of 11008 (r * s_gi and r * s_yr were 32-bit once, wrong addresses for a column-major
# grad_y or y).
NARROW_OK = {"s_ir", "s_vr"}


def narrow_strides(ttir: str, signature: dict) -> list[str]:
    """TTIR lines that splat or multiply a runtime i32 stride argument without widening it to i64 first."""
    strides = [k for k, v in signature.items() if k.startswith("s_") and v == "i32" and k not in NARROW_OK]
    return [line.strip() for line in ttir.splitlines()
            if ("tt.splat" in line or "arith.muli" in line) and "i64" not in line
            and any(re.search(rf"%{name}\b", line) for name in strides)]


def compile_all(targets=(90, 80)) -> int:
    seen, failed = set(), 0
    for fn, args, kwargs, label in LAUNCHES:
        for cc in targets:
            target = GPUTarget("cuda", cc, 32)
            backend = make_backend(target)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            kw = dict(kwargs, debug=False)
            bound, spec, opts = binder(*args, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
            key = (fn.__name__, cc, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
                   repr(sorted(attrs.items(), key=str)))
            if key in seen:
                continue
            seen.add(key)
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
                narrow = narrow_strides(compiled.asm["ttir"], signature)
                if narrow:
                    raise AssertionError(f"a stride multiplied in 32 bits: {narrow[0][:200]}")
                print(f"ok   sm_{cc} {fn.__name__} {label}", flush=True)
            except Exception as exc:  # noqa: BLE001 - reported, then the exit status says it
                failed += 1
                print(f"FAIL sm_{cc} {fn.__name__} {label}: {type(exc).__name__}: {str(exc)[-800:]}", flush=True)
    print(f"{len(seen)} compilations, {failed} failed")
    return failed


if __name__ == "__main__":
    capture()
    sys.exit(1 if compile_all() else 0)
