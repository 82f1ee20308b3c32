"""ONNX models read without their weights: the graph parsed once and every name in it checked to be text, external
data locations kept inside the model's folder, initializer data read lazily and read-only, and the MatMulNBits
weights found (onnx_nbits). A module of its own because the resolver (onnx_resolve), both merge backends (onnx_merge,
onnx_folder_merge) and the runtime's grids (runtime/quant_grid.py) read models through it, and it needs none of them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from neuroada_format import NeuroAdaError
from neuroada_format.safe_io import check_regular, open_regular

try:  # the converters need onnx; the format core does not
    import onnx
    from onnx import TensorProto, numpy_helper
except ImportError as exc:  # pragma: no cover - exercised only without the [onnx] extra
    raise ImportError("ONNX merges need the onnx package: pip install 'neuroada-format[onnx]'",
                      name=exc.name) from exc

from . import onnx_nbits  # noqa: E402  (needs onnx)

FLOAT_TYPES = {
    TensorProto.FLOAT: ("F32", np.dtype("<f4")),
    TensorProto.FLOAT16: ("F16", np.dtype("<f2")),
    TensorProto.BFLOAT16: ("BF16", np.dtype(ml_dtypes.bfloat16)),
}
STORED_TYPES = {**FLOAT_TYPES, TensorProto.UINT8: ("U8", np.dtype(np.uint8))}  # what a merge reads and patches
QUANTIZED_TYPES = {
    TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E5M2FNUZ,
    *(getattr(TensorProto, n) for n in ("INT2", "UINT2", "FLOAT4E2M1", "FLOAT8E8M0") if hasattr(TensorProto, n)),
}
# bits per value of the other types an external tensor can have: one without a "length" reads its dims' worth, which
# the shared-bytes checks must count (packed types: 4 or 2 bits a value, as ONNX stores them)
VALUE_BITS = {
    **{getattr(TensorProto, n): 8 for n in ("BOOL", "INT8", "UINT8", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                                           "FLOAT8E5M2FNUZ", "FLOAT8E8M0") if hasattr(TensorProto, n)},
    TensorProto.INT16: 16, TensorProto.UINT16: 16, TensorProto.INT32: 32, TensorProto.UINT32: 32,
    TensorProto.INT64: 64, TensorProto.UINT64: 64, TensorProto.DOUBLE: 64, TensorProto.COMPLEX64: 64,
    TensorProto.COMPLEX128: 128,
    **{getattr(TensorProto, n): b for n, b in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
       if hasattr(TensorProto, n)},
}
QUANT_OPS = {
    "MatMulNBits", "QLinearMatMul", "MatMulInteger", "DequantizeLinear", "QuantizeLinear",
    "DynamicQuantizeLinear", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "GatherBlockQuantized", "MatMulBnb4", "MatMulFpQ4", "QAttention", "QLinearConv",
}


def _type_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"type {data_type}"


def _shown(value) -> str:
    """A name as text for messages, whether protobuf gave str or (not valid UTF-8) bytes."""
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "backslashreplace")


def _text(value, what: str, path: str, tensor: str | None = None) -> str:
    """`value` as a str. ONNX is proto2, so protobuf parses a string field that is not valid UTF-8 and hands it
    back as bytes; every name here is matched, joined and printed as text, so such a model is refused (rule
    1.6) where it is read, rather than failing as a TypeError deep in a merge."""
    if isinstance(value, str):
        return value
    raise NeuroAdaError(f"{what} {bytes(value)!r} is not valid UTF-8; refusing to read or copy the model",
                        path=path, tensor=tensor, rule="1.6")


def _safe_location(model_dir: str, location: str, model_path: str, tensor: str) -> str:
    """The data file of an external tensor, refusing anything that could reach outside the model folder."""
    bad = None
    if not location or "\x00" in location:
        bad = "is empty"
    elif os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        bad = "is an absolute path"
    elif ".." in location.replace("\\", "/").split("/"):
        bad = "contains '..'"
    if bad is None:
        full = os.path.join(model_dir, location)
        real_dir = os.path.realpath(model_dir)
        if os.path.realpath(full) != os.path.normpath(os.path.join(real_dir, location)):
            bad = "is or passes through a symbolic link"
        elif not os.path.lexists(full):
            bad = "does not exist"
        elif not os.path.isfile(full):  # a FIFO or device would block or never end: a usage error, as elsewhere
            check_regular(full, rule="1.6")
            bad = "is not a regular file"
        else:
            return full
    raise NeuroAdaError(f"external data location {location!r} {bad}; refusing to read or copy it",
                        path=model_path, tensor=tensor, rule="1.6")


def _subgraph_nodes(nodes):
    """Every node inside the subgraphs of `nodes`, at any depth."""
    for node in nodes:
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from g.node
                yield from _subgraph_nodes(g.node)


def _all_tensors(graph):
    """Initializers and tensor attributes of a graph and its subgraphs (any of them may be external)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


@dataclass
class _External:
    file: str        # absolute path of the data file
    location: str    # as written in the model
    offset: int
    nbytes: int


class OnnxModel:
    """An ONNX graph read without its weights; initializer data is mapped lazily, read-only."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.dir = os.path.dirname(os.path.abspath(self.path))
        try:
            with open_regular(self.path, rule="1.1") as f:  # a FIFO or device is refused, never opened to block
                data = f.read()
            self.proto = onnx.load_model_from_string(data)  # external data stays outside (read lazily)
        except NeuroAdaError:
            raise
        except Exception as exc:  # onnx raises DecodeError and friends
            raise NeuroAdaError(f"not a readable ONNX model: {exc}", path=self.path, rule="1.1") from None
        if not self.proto.HasField("graph"):  # (every byte string parses as some message: an empty file, a cut one)
            raise NeuroAdaError("not a readable ONNX model: it holds no graph (an empty or truncated file?)",
                                path=self.path, rule="1.1")
        graph = self.proto.graph
        for t in graph.initializer:
            _text(t.name, "initializer name", self.path, _shown(t.name))
        self.initializers = {t.name: t for t in graph.initializer}
        if len(self.initializers) != len(graph.initializer):  # onnx.checker refuses these too
            seen, dup = set(), None
            for t in graph.initializer:
                if t.name in seen:
                    dup = t.name
                    break
                seen.add(t.name)
            raise NeuroAdaError("the graph has two initializers of this name; which one a runtime uses is not "
                                "defined, so a merge could patch the copy it ignores", path=self.path, tensor=dup,
                                rule="1.6")
        self.external: dict[str, _External] = {}        # main-graph initializers stored outside
        self.external_tensors: list[tuple] = []          # every external tensor: (TensorProto, _External)
        for t in _all_tensors(graph):
            if t.data_location == TensorProto.EXTERNAL:
                _text(t.name, "external tensor name", self.path, _shown(t.name))
                self.external_tensors.append((t, self._external_info(t)))
        for t, ext in self.external_tensors:
            if self.initializers.get(t.name) is t:
                self.external[t.name] = ext
        self.nodes = list(graph.node)
        for n in self.nodes:  # the resolver reads node names and scope metadata as text
            _text(n.name, "node name", self.path)
            for p in n.metadata_props:
                _text(p.key, f"node {n.name!r}: metadata key", self.path)
                _text(p.value, f"node {n.name!r}: metadata value", self.path)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
        # ... and the nodes of every subgraph (If/Loop bodies, which read the main graph's initializers by name:
        # Optimum's decoder_model_merged.onnx keeps its whole decoder in the two branches of one If)
        self.inner_consumers: dict[str, list] = {}
        for n in _subgraph_nodes(graph.node):
            for i, name in enumerate(n.input):
                self.inner_consumers.setdefault(name, []).append((n, i))
            for out in n.output:  # (a branch's Transpose of an initializer: `weight_of` sees through it too)
                self.producer.setdefault(out, n)
        self._arrays: dict[str, np.ndarray] = {}
        # MatMulNBits weights by their graph name (the quantized MatMul's initializer): onnx_nbits
        self.nbits: dict[str, onnx_nbits.NBits] = onnx_nbits.find(self)
        self._nbits_of_node = {id(nb.node): name for name, nb in self.nbits.items()}
        self._weights: dict[str, onnx_nbits.Weight] = {}

    def close(self) -> None:
        """Let go of the external data's maps (backend.merge calls it when the merge ends, a refusal included)."""
        self._arrays.clear()
        self._weights.clear()

    def quantized(self, name: str) -> onnx_nbits.NBits | None:
        """The MatMulNBits weight `name` names, or None (an initializer's name, B's own included, is the initializer)."""
        return None if name in self.initializers else self.nbits.get(name)

    def nbits_weight(self, name: str) -> onnx_nbits.Weight:
        """The stored parts of MatMulNBits weight `name`, made once (probes, merges and `array` all read them)."""
        if name not in self._weights:
            self._weights[name] = onnx_nbits.Weight(self, self.nbits[name])
        return self._weights[name]

    def _external_info(self, t) -> _External:
        entries = {}
        for e in t.external_data:
            key = _text(e.key, "external data key", self.path, t.name)
            entries[key] = _text(e.value, f"external data {key}", self.path, t.name)
        file = _safe_location(self.dir, entries.get("location", ""), self.path, t.name)
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise NeuroAdaError(f"external data offset/length {entries.get('offset')!r}/{entries.get('length')!r} "
                                f"is not an integer", path=self.path, tensor=t.name, rule="1.6") from None
        nbytes = None
        if t.data_type in STORED_TYPES:
            nbytes = int(np.prod(t.dims, dtype=np.int64)) * STORED_TYPES[t.data_type][1].itemsize
        elif length is None and t.data_type in VALUE_BITS:  # (a length given is taken as it is, as before)
            nbytes = -(-int(np.prod(t.dims, dtype=np.int64)) * VALUE_BITS[t.data_type] // 8)
        if length is not None:
            if nbytes is not None and length != nbytes:
                raise NeuroAdaError(f"external data length {length} != {nbytes} bytes for dims {list(t.dims)}",
                                    path=self.path, tensor=t.name, rule="1.6")
            nbytes = length
        if nbytes is not None and (offset < 0 or offset + nbytes > os.path.getsize(file)):
            raise NeuroAdaError(f"external data [{offset}, {offset + nbytes}) lies outside {entries['location']}",
                                path=self.path, tensor=t.name, rule="1.6")
        return _External(file, entries["location"], offset, nbytes or 0)

    # -- tensors -----------------------------------------------------------------------------------
    def dtype(self, name: str) -> str | None:
        """F32/F16/BF16 for float initializers, None otherwise; F32 for a MatMulNBits weight (its values decode
        to binary32)."""
        if self.quantized(name):
            return "F32"
        entry = FLOAT_TYPES.get(self.initializers[name].data_type)
        return entry[0] if entry else None

    def shape(self, name: str) -> tuple[int, ...]:
        nb = self.quantized(name)
        if nb is not None:
            return nb.N, nb.K  # [d_out, d_in], as MatMulNBits stores it
        return tuple(int(d) for d in self.initializers[name].dims)

    def array(self, name: str) -> np.ndarray:
        """The stored tensor (read-only): a memory map for external data, a buffer view for inline; a MatMulNBits
        weight decoded whole (f32 [N, K]; merges and probes decode only the blocks they need)."""
        if name in self._arrays:
            return self._arrays[name]
        nb = self.quantized(name)
        if nb is not None:
            onnx_nbits.refuse(self, nb, name)
            self._arrays[name] = self.nbits_weight(name).decode_all()
            return self._arrays[name]
        t = self.initializers[name]
        if t.data_type not in FLOAT_TYPES:
            raise NeuroAdaError(f"initializer is {_type_name(t.data_type)}, not F32/F16/BF16",
                                path=self.path, tensor=name, rule="4.2")
        return self.stored(name)

    def stored(self, name: str) -> np.ndarray:
        """An F32/F16/BF16 or UINT8 initializer as stored (read-only), by `array`'s means."""
        if name in self._arrays:
            return self._arrays[name]
        t = self.initializers[name]
        if t.data_type not in STORED_TYPES:
            raise NeuroAdaError(f"initializer is {_type_name(t.data_type)}, not F32/F16/BF16 or UINT8",
                                path=self.path, tensor=name, rule="4.2")
        dt = STORED_TYPES[t.data_type][1]
        shape = self.shape(name)
        if name in self.external:
            ext = self.external[name]
            if int(np.prod(shape)) == 0:
                arr = np.empty(shape, dt)
            else:
                with open_regular(ext.file, rule="1.6") as f:  # never blocks on a FIFO swapped in since the check
                    arr = np.memmap(f, dtype=dt, mode="r", offset=ext.offset, shape=shape)
        else:
            arr = self._inline(t, name, dt).reshape(shape)
        self._arrays[name] = arr
        return arr

    def _inline(self, t, name: str, dt: np.dtype) -> np.ndarray:
        """An inline initializer's values, flat. They must fill its dims exactly: a truncated or emptied tensor, or
        an external one whose data_location was flipped to DEFAULT (no inline data at all), is a broken model
        (rule 1.6), not a reshape error."""
        need = math.prod(int(d) for d in t.dims)
        if t.HasField("raw_data"):
            raw = t.raw_data
            held, wanted = f"{len(raw)} bytes", f"{need * dt.itemsize} bytes"
            ok = len(raw) == need * dt.itemsize
        else:  # typed fields: float_data for F32, int32_data (one 16-bit pattern each) for F16/BF16
            count = len(t.float_data if t.data_type == TensorProto.FLOAT else t.int32_data)
            held, wanted, ok = f"{count} values", f"{need} values", count == need
        if not ok or min(t.dims, default=0) < 0:
            hint = "; it has external data entries, but data_location is not EXTERNAL" if t.external_data else ""
            raise NeuroAdaError(f"inline data holds {held}, its dims {list(t.dims)} need {wanted}{hint}",
                                path=self.path, tensor=name, rule="1.6")
        if t.HasField("raw_data"):
            return np.frombuffer(raw, dtype=dt)
        return numpy_helper.to_array(t).astype(dt, copy=False).reshape(-1)

    def weight_of(self, node, index: int):
        """The initializer feeding input `index` of a node, through at most one 2-D Transpose, and
        whether it arrives transposed; (None, False) when the input is computed."""
        if index >= len(node.input):
            return None, False
        name = node.input[index]
        if name in self.initializers:
            return name, False
        prod = self.producer.get(name)
        if prod is not None and prod.op_type == "Transpose" and prod.input and prod.input[0] in self.initializers:
            perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), [1, 0])
            if perm == [1, 0] and len(self.shape(prod.input[0])) == 2:
                return prod.input[0], True
        if prod is not None and prod.op_type in QUANT_OPS:
            return ("quantized", prod), False
        return None, False

    def usage(self, node):
        """(initializer, stored layout) of a linear-like node's weight, ("quantized", node) or None."""
        op = node.op_type
        if op == onnx_nbits.OP and id(node) in self._nbits_of_node:
            return self._nbits_of_node[id(node)], "out_in"   # B holds W as [N, K] = [d_out, d_in]
        if op in QUANT_OPS:
            return ("quantized", node), None
        if op == "Gather":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            name, transposed = self.weight_of(node, 0)
            if isinstance(name, str) and axis == 0 and not transposed:
                return name, "out_in"   # an embedding table: rows are what gets picked
            return name if isinstance(name, tuple) else None, None
        if op in ("MatMul", "Gemm"):
            name, transposed = self.weight_of(node, 1)
            if not isinstance(name, str):
                return name, None
            if op == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute):
                transposed = not transposed
            # MatMul(x, W) takes W as [in, out]; a transpose (node or transB) means [out, in] is stored
            return name, ("out_in" if transposed else "in_out")
        return None, None
