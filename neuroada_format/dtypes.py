"""Safetensors dtype names <-> numpy dtypes, and the f32 round-once helpers the merge rule needs.

numpy has no bfloat16 of its own; ml_dtypes provides it (and the float8 types bases may contain).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

# Every dtype a safetensors file may declare, so that any base checkpoint parses.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}

INDEX_DTYPES = ("I16", "I32")
VALUE_DTYPES = ("BF16", "F16", "F32")
BASE_DTYPES = ("F32", "F16", "BF16")
I16_MAX_D_IN = 32768  # every column number 0..32767 fits in int16


def dtype_name(dtype) -> str:
    """The safetensors name of a numpy dtype (raises KeyError for dtypes safetensors has no name for)."""
    dt = np.dtype(dtype)
    for name, candidate in NUMPY_DTYPES.items():
        if candidate == dt:
            return name
    raise KeyError(f"no safetensors dtype for numpy dtype {dt}")


def native(dtype) -> np.dtype:
    """`dtype` in this machine's byte order. A big-endian array (">f4") holds the same values as its
    little-endian twin, but has no safetensors name of its own: callers that copy anyway convert to this."""
    dt = np.dtype(dtype)
    return dt if dt.isnative else dt.newbyteorder("=")


# Names for dtypes of in-memory bases that safetensors spells but NUMPY_DTYPES leaves out on purpose (an
# adapter or base file declaring them stays an unknown dtype, spec 2.2); used only to describe a base.
_OTHER_NAMES = {np.dtype(np.complex64): "C64"}


def dtype_label(dtype) -> str:
    """What an in-memory base tensor's dtype is called in reports and the structure hash: its safetensors
    name whatever the byte order, else numpy's name upper-cased ("COMPLEX128"), else str() for a dtype that
    numpy does not know (a torch dtype). Never raises: a non-target buffer of any dtype (a complex rope
    table) must not stop a validation, and a target of such a dtype is then refused by rule 4.2."""
    try:
        dt = native(dtype)
    except TypeError:
        return str(dtype)
    try:
        return dtype_name(dt)
    except KeyError:
        return _OTHER_NAMES.get(dt, dt.name.upper())


def index_dtype_for(d_in: int) -> str:
    """The index dtype a writer uses: I16 whenever every column number fits."""
    return "I16" if d_in <= I16_MAX_D_IN else "I32"


def common_value_dtype(names) -> str:
    """The value dtype several adapters share, or F32 when they differ (every value is exact in F32)."""
    names = set(names)
    return names.pop() if len(names) == 1 else "F32"


def round_to(values_f32: np.ndarray, dtype_name_: str) -> np.ndarray:
    """Round f32 values to a base dtype, round-to-nearest-even (ml_dtypes/numpy casts do exactly that)."""
    return np.asarray(values_f32, dtype=np.float32).astype(NUMPY_DTYPES[dtype_name_])


def nonfinite_mask(values: np.ndarray) -> np.ndarray:
    """True where a value is NaN or +-Inf, decided on the bits so it is cheap for bf16/f16 too."""
    dt = values.dtype
    if dt == NUMPY_DTYPES["BF16"]:
        return (values.view(np.uint16) & 0x7F80) == 0x7F80
    if dt == NUMPY_DTYPES["F16"]:
        return (values.view(np.uint16) & 0x7C00) == 0x7C00
    return ~np.isfinite(values)
