"""Triton kernels for CUDA tensors (and, for tests, the Triton interpreter on CPU tensors).

Rules followed throughout, because the interpreter and bf16 get them wrong otherwise: every load is
masked and upcast right away, sums accumulate in f32 (f64 when the output buffer is f64), no
``tl.dot`` is used, and no kernel rounds to a narrow float: kernels write f32 and torch rounds
(RNE), while stores into the weight move raw bits through an integer view.

``TRITON_INTERPRET=1`` is read when the kernels are decorated, i.e. when this module is imported;
set it before the first import to run these kernels on CPU tensors.
"""

from __future__ import annotations

import math
import os

import torch

from neuroada_format import NeuroAdaUsageError

from .pattern import as_pattern, weight_pattern
from .reference import INT_VIEW, acc_dtype

try:  # keep the package importable where triton is absent
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None

AVAILABLE = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["AVAILABLE", "INTERPRET", "scatter_", "restore_", "put_", "sampled_rowdot", "gather_matvec", "gather_matvec_t"]

def _check(*tensors: torch.Tensor) -> None:
    if not AVAILABLE:
        raise NeuroAdaUsageError("triton is not installed")
    for t in tensors:
        if not t.is_cuda and not INTERPRET:
            raise NeuroAdaUsageError(
                "Triton kernels got a CPU tensor; set TRITON_INTERPRET=1 before importing "
                "neuroada_format.runtime.kernels.triton to run them in the interpreter"
            )


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


GRID_MAX = 2**31 - 1  # CUDA's limit on grid axis 0; axes 1 and 2 stop at 65,535


def flat_grid(*counts: int) -> tuple[int]:
    """A flat, one-axis launch grid of ``prod(counts)`` programs, which the kernel splits back itself.

    Putting row blocks on axis 1 would cap a launch at 65,535 of them: a 128k-row vocabulary head at
    k >= 129 (one row per program) would not launch at all. Axis 0 takes 2^31 - 1.
    """
    n = math.prod(int(c) for c in counts)
    if n > GRID_MAX:
        raise NeuroAdaUsageError(f"a launch of {n} programs exceeds CUDA's grid limit ({GRID_MAX}); split the "
                                 "input into fewer tokens per call")
    return (n,)


if AVAILABLE:

    @triton.jit
    def _store_bits_kernel(dst_ptr, flat_ptr, src_ptr, n, BLOCK: tl.constexpr):
        # dst/src are integer views of the float data: a pure move, no rounding anywhere
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        pos = tl.load(flat_ptr + offs, mask=m, other=0)
        v = tl.load(src_ptr + offs, mask=m, other=0)
        tl.store(dst_ptr + pos, v, mask=m)

    @triton.jit
    def _add_kernel(a_ptr, b_ptr, out_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(a_ptr + offs, mask=m, other=0).to(ACC)
        b = tl.load(b_ptr + offs, mask=m, other=0).to(ACC)
        tl.store(out_ptr + offs, a + b, mask=m)

    @triton.jit
    def _rowdot_kernel(gy_ptr, x_ptr, idx_ptr, out_ptr, T, d_out, k, n_r, t_span,
                       s_gt, s_gi, s_xt, s_xc,
                       ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
        # one flat grid (see flat_grid): program = row block pid % n_r x token span pid // n_r, BLOCK_R rows x all
        # k entries, marching over its span's tokens in tiles. Each span writes its partial sums to its own
        # [d_out, k] slice of out; the host adds the slices in a fixed order (no atomics: deterministic)
        pid = tl.program_id(0)
        span = pid // n_r
        r = (pid % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_K)
        rm = r < d_out
        m2 = rm[:, None] & (j < k)[None, :]
        cols = tl.load(idx_ptr + r[:, None] * k + j[None, :], mask=m2, other=0)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC)
        t_lo = span.to(tl.int64) * t_span
        t_hi = tl.minimum(t_lo + t_span, T)
        for t0 in range(0, t_span, BLOCK_T):  # bounds from arguments, not from program ids (the interpreter's rule)
            t = t_lo + t0 + tl.arange(0, BLOCK_T)  # int64: t x stride passes 2^31 past ~195k tokens of 11008
            tm = t < t_hi
            g = tl.load(gy_ptr + t[:, None] * s_gt + r[None, :].to(tl.int64) * s_gi,  # (a column-major grad_y)
                        mask=tm[:, None] & rm[None, :], other=0).to(ACC)
            xv = tl.load(x_ptr + t[:, None, None] * s_xt + cols[None, :, :] * s_xc,
                         mask=tm[:, None, None] & m2[None, :, :], other=0).to(ACC)
            acc += tl.sum(g[:, :, None] * xv, axis=0)
        base = span.to(tl.int64) * d_out * k
        tl.store(out_ptr + base + r[:, None] * k + j[None, :], acc, mask=m2)

    @triton.jit
    def _gather_kernel(x_ptr, idx_ptr, val_ptr, out_ptr, T, d_out, k,
                       s_xt, s_xc,
                       ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # one flat grid (see flat_grid): program = token tile pid % n_t x row block pid // n_t
        pid = tl.program_id(0)
        n_t = tl.cdiv(T, BLOCK_T)
        t = ((pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # see _rowdot_kernel
        r = (pid // n_t) * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_K)
        tm = t < T
        rm = r < d_out
        m2 = rm[:, None] & (j < k)[None, :]
        cols = tl.load(idx_ptr + r[:, None] * k + j[None, :], mask=m2, other=0)
        v = tl.load(val_ptr + r[:, None] * k + j[None, :], mask=m2, other=0).to(ACC)
        xv = tl.load(x_ptr + t[:, None, None] * s_xt + cols[None, :, :] * s_xc,
                     mask=tm[:, None, None] & m2[None, :, :], other=0).to(ACC)
        s = tl.sum(xv * v[None, :, :], axis=2)
        tl.store(out_ptr + t[:, None] * d_out + r[None, :], s, mask=tm[:, None] & rm[None, :])

    @triton.jit
    def _segment_kernel(gy_ptr, colptr_ptr, rows_ptr, perm_ptr, val_ptr, out_ptr, T, d_in,
                        s_gt, s_gi,
                        ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        # one program = one input column c x a token tile: reduce its CSC segment in a fixed order.
        # One flat grid (see flat_grid): column pid // n_t, token tile pid % n_t
        pid = tl.program_id(0)
        n_t = tl.cdiv(T, BLOCK_T)
        c = pid // n_t
        t = ((pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # see _rowdot_kernel
        tm = t < T
        start = tl.load(colptr_ptr + c)
        end = tl.load(colptr_ptr + c + 1)
        acc = tl.zeros((BLOCK_T,), dtype=ACC)
        for e0 in range(start, end, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            em = e < end
            rows = tl.load(rows_ptr + e, mask=em, other=0)
            p = tl.load(perm_ptr + e, mask=em, other=0)
            v = tl.load(val_ptr + p, mask=em, other=0).to(ACC)
            g = tl.load(gy_ptr + t[:, None] * s_gt + rows[None, :] * s_gi,
                        mask=tm[:, None] & em[None, :], other=0).to(ACC)
            acc += tl.sum(g * v[None, :], axis=1)
        tl.store(out_ptr + t * d_in + c, acc, mask=tm)


def put_(W: torch.Tensor, flat: torch.Tensor, values: torch.Tensor, *, block: int = 1024) -> torch.Tensor:
    """Write already-rounded ``values`` at flat positions of the contiguous W (bit moves only)."""
    _check(W, flat)
    if not W.is_contiguous():
        raise NeuroAdaUsageError("in-place sparse writes need a contiguous weight; use the additive mode")
    n = flat.numel()
    if n == 0:
        return W
    ity = INT_VIEW[W.element_size()]
    src = values.reshape(-1).to(W.dtype).contiguous().view(ity)
    flat = flat.reshape(-1).contiguous()
    _store_bits_kernel[flat_grid(triton.cdiv(n, block))](W.view(-1).view(ity), flat, src, n, BLOCK=block)
    # a raw-pointer store moves no version: do it by hand, as for any in-place write (merge between a forward
    # and its backward must be caught). The in-place training path passes weight.data, whose counter is its own.
    if not W.is_inference() and not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(W)
    return W


def scatter_(W: torch.Tensor, idx, w0: torch.Tensor, val: torch.Tensor, *, transposed: bool = False,
             block: int = 1024) -> torch.Tensor:
    p = weight_pattern(W, idx, transposed)
    _check(W, w0, val)
    n = p.nnz
    acc = acc_dtype(w0, val)
    tmp = torch.empty(n, dtype=acc, device=W.device)
    if n:
        _add_kernel[flat_grid(triton.cdiv(n, block))](w0.reshape(-1).contiguous(), val.reshape(-1).contiguous(), tmp, n,
                                               ACC=_tl_acc(acc), BLOCK=block)
    return put_(W, p.flat, tmp.to(W.dtype), block=block)  # torch rounds (RNE); the kernel only moves bits


def restore_(W: torch.Tensor, idx, w0: torch.Tensor, *, transposed: bool = False, block: int = 1024) -> torch.Tensor:
    p = weight_pattern(W, idx, transposed)
    return put_(W, p.flat, w0, block=block)


# Register budget for the 3-D [tokens, rows, k] tiles; untuned guesses (no GPU was at hand), chosen
# so a tile holds ~4K f32 values whatever k is. Override per call through the keyword arguments.
_TILE = 4096


def _rows_per_program(bk: int, bt: int, cap: int) -> int:
    return max(1, min(cap, _TILE // (bk * bt)))


# f32 elements of one [rows, d_in] block of the dense product in _rowdot_dense (64 MB): bounds the
# transient whatever the layer's width, e.g. 3 blocks for a 7B down_proj (d_in 11008).
DENSE_BLOCK = 1 << 24
# None: the dense product for 16-bit CUDA inputs at k >= DENSE_MIN_K (when torch.mm takes out_dtype); False: the
# gather kernel for every input; True: the product for any same-dtype, non-f64 pair at any k (tests, and
# bench/gpu.py's side-by-side rows)
DENSE_ROWDOT: bool | None = None
# k=1 keeps the gather kernel: on an H200 (bench/gpu.py, bf16, 1B-shaped Llama, batch 4 x 512, one process each) a
# k=1 step took 71.0 ms with it and 80.7 ms with the product, the step being host time (the product is two stock
# launches plus slicing, the kernel one launch, and since 0ca72fe no zero fill). At k=20 the product won (3.16x the
# floor against the kernel's 3.97x, two runs on two hosts).
DENSE_MIN_K = 2
# per input dtype, once an eager CUDA call has found out: does torch.mm take out_dtype (torch >= 2.8 on CUDA)
_mm_out_dtype: dict[torch.dtype, bool] = {}


def _product_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in f32 from 16-bit operands: every product is exact and the sums are f32's, as in the reference."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # the interpreter's CPU tensors (tests)


def _dense_ok(grad_y: torch.Tensor, x: torch.Tensor, k: int) -> bool:
    if DENSE_ROWDOT is not None:
        return DENSE_ROWDOT and x.dtype == grad_y.dtype and x.dtype != torch.float64
    if k < DENSE_MIN_K or not (grad_y.is_cuda and x.dtype == grad_y.dtype
                               and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if x.dtype not in _mm_out_dtype:
        if torch.compiler.is_compiling():  # no probing inside a trace: the kernel until an eager call has looked
            return False
        try:
            a = torch.ones(16, 16, dtype=x.dtype, device=x.device)
            _mm_out_dtype[x.dtype] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _mm_out_dtype[x.dtype] = False
    return _mm_out_dtype[x.dtype]


def _rowdot_dense(grad_y: torch.Tensor, x: torch.Tensor, p) -> torch.Tensor:
    """All of ``grad_y^T x`` on the tensor cores, then k entries of each row kept (a block of rows at a time).

    The product does ~d_in/k times the arithmetic of the gather kernel below, which reads only the k
    sampled columns, but at tensor-core rates, like full fine-tuning's weight gradient. On an H200
    (bench/gpu.py, 1B-shaped Llama, batch 4 x 512, bf16) the gather kernel made a k=20 step 3.97x the
    frozen floor (2.26x PEFT LoRA r=8), the dense product 3.16x (1.44x LoRA) at the same peak memory;
    two runs on two hosts (bench/RESULTS.md). fp32 inputs keep the gather kernel: no tensor cores there.
    """
    rows = max(1, DENSE_BLOCK // max(p.d_in, 1))
    blocks = [_product_f32(grad_y[:, r0:r0 + rows].t(), x).gather(1, p.idx[r0:r0 + rows])
              for r0 in range(0, p.d_out, rows)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


# programs per streaming multiprocessor that the rowdot kernel aims for: with one program per 64 rows at k=1, a
# 5632-row layer started 88 programs on an H200's 132 SMs, each walking every token (132 us a call, about three
# times the dense product's device time; bench/RESULTS.md, CUDA section). Splitting the tokens into spans fills the
# GPU; the spans' partial sums are then added in a fixed order.
ROWDOT_PROGRAMS_PER_SM = 4
_sm_count: dict[int, int] = {}


def _token_spans(n_r: int, T: int, bt: int, device: torch.device) -> int:
    """How many token spans the rowdot kernel splits T into: 1 under the interpreter (no SMs to fill)."""
    if device.type != "cuda":
        return 1
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _sm_count:
        if torch.compiler.is_compiling():  # no device query inside a trace: one span until an eager call has looked
            return 1
        _sm_count[i] = torch.cuda.get_device_properties(i).multi_processor_count
    want = triton.cdiv(ROWDOT_PROGRAMS_PER_SM * _sm_count[i], n_r)
    return max(1, min(want, triton.cdiv(T, bt)))


def sampled_rowdot(grad_y: torch.Tensor, x: torch.Tensor, idx, *, block_r: int | None = None,
                   block_t: int = 32, token_spans: int | None = None) -> torch.Tensor:
    """The dense product for 16-bit CUDA inputs at k >= 2 (see _rowdot_dense, DENSE_ROWDOT and DENSE_MIN_K), the gather
    kernel otherwise."""
    p = as_pattern(idx, x.shape[-1])
    _check(grad_y, x, p.idx)
    acc = acc_dtype(grad_y, x)
    T = grad_y.shape[0]
    if T and p.nnz and _dense_ok(grad_y, x, p.k):
        return _rowdot_dense(grad_y, x, p)
    if T == 0 or p.nnz == 0:
        return torch.zeros(p.d_out, p.k, dtype=acc, device=x.device)
    bk = _pow2(p.k)
    bt = _pow2(min(block_t, T))
    br = _pow2(block_r or _rows_per_program(bk, bt, 64))
    n_r = triton.cdiv(p.d_out, br)
    spans = token_spans if token_spans is not None else _token_spans(n_r, T, bt, x.device)
    t_span = triton.cdiv(triton.cdiv(T, max(1, spans)), bt) * bt  # whole tiles per span
    spans = triton.cdiv(T, t_span)
    # every entry is written (each span stores all its rows), so no zero fill
    out = torch.empty(spans, p.d_out, p.k, dtype=acc, device=x.device)
    _rowdot_kernel[flat_grid(n_r, spans)](
        grad_y, x, p.idx.contiguous(), out, T, p.d_out, p.k, n_r, t_span,
        grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
        ACC=_tl_acc(acc), BLOCK_R=br, BLOCK_K=bk, BLOCK_T=bt,
    )
    return out[0] if spans == 1 else out.sum(0)


def gather_matvec(x: torch.Tensor, idx, val: torch.Tensor, *, block_t: int = 16,
                  block_r: int | None = None) -> torch.Tensor:
    p = as_pattern(idx, x.shape[-1])
    _check(x, val, p.idx)
    acc = acc_dtype(x, val)
    T = x.shape[0]
    out = torch.zeros(T, p.d_out, dtype=acc, device=x.device)
    if T == 0 or p.nnz == 0:
        return out
    bk = _pow2(p.k)
    bt = _pow2(min(block_t, T))
    br = _pow2(block_r or _rows_per_program(bk, bt, 128))
    _gather_kernel[flat_grid(triton.cdiv(T, bt), triton.cdiv(p.d_out, br))](
        x, p.idx.contiguous(), val.contiguous(), out, T, p.d_out, p.k,
        x.stride(0), x.stride(1),
        ACC=_tl_acc(acc), BLOCK_T=bt, BLOCK_R=br, BLOCK_K=bk,
    )
    return out


def gather_matvec_t(grad_y: torch.Tensor, idx, val: torch.Tensor, d_in: int | None = None, *,
                    block_t: int = 64, block_e: int = 32) -> torch.Tensor:
    p = as_pattern(idx, d_in)
    _check(grad_y, val, p.idx)
    acc = acc_dtype(grad_y, val)
    T = grad_y.shape[0]
    out = torch.zeros(T, p.d_in, dtype=acc, device=grad_y.device)
    if T == 0 or p.nnz == 0:
        return out
    colptr, rows, perm = p.csc
    bt = _pow2(min(block_t, T))
    _segment_kernel[flat_grid(p.d_in, triton.cdiv(T, bt))](
        grad_y, colptr, rows, perm, val.contiguous(), out, T, p.d_in,
        grad_y.stride(0), grad_y.stride(1),
        ACC=_tl_acc(acc), BLOCK_T=bt, BLOCK_E=block_e,
    )
    return out
