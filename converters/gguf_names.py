"""Hugging Face names -> GGUF tensors: which tensor of a llama.cpp file a checkpoint key names, how llama.cpp's
converter reordered its rows, and the file as a base keyed by those names, de-quantized for validation (spec
section 15.2). A module of its own because validation, `neuroada-pack --base`, the runtime's grids and the merge
all find their targets through it, and its per-architecture tables are what grows when an architecture is added.

Targets keep their Hugging Face names. `model.layers.0.self_attn.q_proj.weight` maps to `blk.0.attn_q.weight`
through gguf's TensorNameMap; for the Llama family llama.cpp's converter permuted the rows of attn_q and
attn_k (rope layout), so an adapter's row r lands on GGUF row `inverse[r]` of that permutation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import numpy as np

from neuroada_format import NeuroAdaError, NeuroAdaUsageError

from .gguf_read import FLOAT_TYPES, GGUFFile, decodable
from .gguf_split import GGUFSet, read_gguf_or_set

# Architectures whose Hugging Face keys we map (gguf-py's name table), and which rows llama.cpp's converter reorders:
# "rope" permutes the attn_q/attn_k rows (`rope_permutation`), "qkv" regroups the fused query_key_value rows
# (`qkv_permutation`), None stores every linear weight as the checkpoint holds it. Only those whose converter does
# nothing else to a linear weight: Llama ("rope"; also Mistral, which llama.cpp writes as llama, and Mistral 3: see
# TEXT_PREFIXES), Qwen2/3, Qwen2-MoE and Qwen3-MoE (their 3-D experts are no targets; see gguf_read.ONE_ROW), Gemma 1-3
# (their norm weights are stored plus one, never a linear target), Gemma 4 (see below TEXT_PREFIXES), Phi-3 (qkv_proj
# and gate_up_proj stay fused, as attn_qkv and ffn_up), StarCoder2, StableLM, Nemotron (norms plus one, as Gemma's),
# GPT-2 (see TRANSPOSED), Bloom and Falcon ("qkv": the checkpoint interleaves q, k and v by head or by key/value group;
# llama.cpp stores all query heads, then the keys, then the values), gpt-oss (attention and router as held; its experts,
# transposed and split into 3-D tensors, are no targets) and LFM2 (`lfm2`: every linear as held; see RESHAPED). Each is
# checked end to end (tests/converters/test_gguf_architectures.py, test_gguf_gemma4.py and test_gguf_gptoss_lfm2.py:
# through transformers' GGUF loader where it reads the architecture; test_llama_cpp_archs.py: llama.cpp runs every
# merged file as the runtime's merged model); anything else is refused rather than guessed.
ARCHS = {"llama": "rope", "qwen2": None, "qwen3": None, "qwen2moe": None, "qwen3moe": None, "gemma": None,
         "gemma2": None, "gemma3": None, "gemma4": None, "phi3": None, "gpt2": None, "starcoder2": None,
         "stablelm": None, "nemotron": None, "bloom": "qkv", "falcon": "qkv", "gpt-oss": None, "lfm2": None,
         "mistral3": "rope"}

# GPT-2's checkpoint holds its linear weights as Conv1D [d_in, d_out] (the adapter's `in_out` layout); llama.cpp's
# converter transposes them to [d_out, d_in], the canonical orientation. Such a tensor is presented in the
# checkpoint's orientation (info, array), so validation compares it with the adapter as stored, while the merge works
# on canonical positions, which the file stores as they are.
TRANSPOSED = {"gpt2": ("attn_qkv", "attn_output", "ffn_up", "ffn_down")}

# The Hugging Face key that transformers' model class of the architecture uses for a GGUF block tensor, where
# gguf-py's table lists several aliases and its order picks another (Gemma's ffn_up lists gate_up_proj first, Phi-3's
# up_proj): `keys()` must give the names a fine-tuned checkpoint of that architecture has.
BLOCK_KEYS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
BLOCK_KEYS_OF = {"phi3": {**BLOCK_KEYS, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
                 "gemma4": {**BLOCK_KEYS, "ffn_gate_inp": "router.proj"},  # (the table's first key is Mixtral's)
                 "gpt-oss": {**BLOCK_KEYS, "ffn_gate_inp": "mlp.router"},
                 "lfm2": {**BLOCK_KEYS, "attn_output": "self_attn.out_proj", "ffn_gate": "feed_forward.w1",
                          "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2", "attn_norm": "operator_norm",
                          "ffn_norm": "ffn_norm"},
                 "gpt2": {"attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_up": "mlp.c_fc",
                          "ffn_down": "mlp.c_proj", "attn_norm": "ln_1", "ffn_norm": "ln_2"},
                 "starcoder2": {**BLOCK_KEYS, "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
                 "bloom": {"attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value",
                           "attn_output": "self_attention.dense", "ffn_norm": "post_attention_layernorm",
                           "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"},
                 "falcon": {"attn_norm": "input_layernorm", "attn_norm_2": "ln_attn",
                            "attn_qkv": "self_attention.query_key_value", "attn_output": "self_attention.dense",
                            "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}}
# ... and for the tensors outside the blocks, where the table's order picks another family's alias (GPT-2's wte)
_BLOOM_OUTER = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f", "output": "lm_head"}
OUTER_KEYS_OF = {"bloom": {**_BLOOM_OUTER, "token_embd_norm": "transformer.word_embeddings_layernorm"},
                 "falcon": _BLOOM_OUTER, "lfm2": {"token_embd_norm": "model.embedding_norm"}}
# Falcon's new decoder architecture (40B, 180B) has two norms per block, ln_attn (attn_norm_2, present only in such
# files) and ln_mlp, which gguf-py's table maps to attn_norm in place of input_layernorm
NEW_DECODER_KEYS = {"falcon": ("attn_norm_2", {"attn_norm": "ln_mlp"})}
# ... and the prefixes of that class's keys: its blocks' and those of every key `keys()` lists
BLOCK_PREFIX = {"gpt2": "transformer.h.", "bloom": "transformer.h.", "falcon": "transformer.h."}
KEY_PREFIXES = {"gpt2": ("transformer.", "lm_head"), "bloom": ("transformer.", "lm_head"),
                "falcon": ("transformer.", "lm_head")}

# GGUF tensors that gguf-py's table maps a Hugging Face key to but that llama.cpp's converter stored in another shape
# than the key's tensor, no linear weight: LFM2's depthwise conv kernel `conv.conv` (a Conv1d, [hidden, 1, L] in the
# checkpoint) is squeezed to blk.N.shortconv.conv [hidden, L]. The key maps to nothing (4.1): a [hidden, L] target
# keyed by it would be no weight of the checkpoint. The file's own name still names the tensor.
RESHAPED = {"lfm2": ("shortconv.conv",)}

# Prefixes llama.cpp's converter drops from a key before it looks the key up in gguf-py's table (old -> new), so a
# key is read the same way. Multimodal checkpoints whose text model llama.cpp writes as the architecture's GGUF (the
# vision tower goes to a separate mmproj file): Gemma 3 4B and larger are Gemma3ForConditionalGeneration, saved with
# the text weights under `language_model.model.` (transformers 5 holds them as `model.language_model.`), and
# llama.cpp drops the prefix. Bloom's converter drops `transformer.` from every key (the table lists Bloom's
# `h.N.post_attention_layernorm` and `word_embeddings_layernorm` only without it). llama.cpp writes Ministral 3 and
# Mistral3ForConditionalGeneration's text model (Mistral Small 3.1/3.2) as `mistral3` through its LlamaModel (q/k rows
# permuted for rope), dropping `language_model.` from every key (its Pixtral vision tower goes to the mmproj file).
TEXT_PREFIXES = {"gemma3": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                            ("model.language_model.", "model.")),
                 "bloom": (("transformer.", ""),),
                 "gemma4": (("model.language_model.", "model."),),
                 "mistral3": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                              ("model.language_model.", "model."))}

# Gemma 4's text model (Gemma4ForCausalLM, and Gemma4ForConditionalGeneration's `model.language_model.`, the prefix
# llama.cpp's converter drops; vision and audio towers go to the mmproj file) is written as `gemma4` with every 2-D
# weight as the checkpoint holds it: attention (sliding and full layers differ only in their shapes; a layer with
# attention_k_eq_v has no v_proj, a kv-shared layer no k/v), the dense MLP (double wide on kv-shared layers), the
# router's proj (blk.N.ffn_gate_inp), the per-layer-embedding linears (per_layer_model_proj, blk.N.inp_gate,
# blk.N.proj), and the norms unshifted (Gemma 4's RMSNorm scales by w, not 1 + w). What it changes is no linear: the
# router's scale and per-expert scale become blk.N.ffn_gate_inp.scale and blk.N.ffn_down_exps.scale, the experts stay
# 3-D (ffn_gate_up_exps, ffn_down_exps: no targets), embed_tokens loses the rows past the tokenizer's vocabulary, and
# a generated rope_freqs is added. Checked in tests/converters/test_gguf_gemma4.py.


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")
    except PackageNotFoundError:
        return "version unknown"


_BLOCK_NAME = re.compile(r"blk\.(\d{1,5})\.")


def name_table(arch, blocks) -> "gguf.TensorNameMap":
    """gguf-py's TensorNameMap of `arch` for the given block numbers only (its own covers 0..n-1, built whole).
    Built as gguf-py builds it (tests/converters/test_gguf.py checks the two agree)."""
    table = gguf.TensorNameMap(arch, 0)  # the names outside the blocks
    config = {**table.block_mappings_cfg, **table.arch_block_mappings_cfg.get(arch, {})}
    known = gguf.MODEL_TENSORS[arch]
    for bid in blocks:
        for tensor, keys in config.items():
            if tensor in known:
                name = gguf.TENSOR_NAMES[tensor].format(bid=bid)
                table.mapping[name] = (tensor, name)
                for key in keys:
                    table.mapping[key.format(bid=bid)] = (tensor, name)
    return table


def rope_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """perm with gguf_row[i] = hf_row[perm[i]], as llama.cpp's converter permutes q/k for rope."""
    if n_head <= 0 or n_rows % (2 * n_head):
        raise NeuroAdaError(f"{n_rows} rows do not split into {n_head} heads of two rope halves", rule="4.2")
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def qkv_permutation(n_rows: int, n_head: int, n_head_kv: int) -> np.ndarray:
    """perm with gguf_row[i] = hf_row[perm[i]] for a fused query_key_value whose checkpoint rows come in n_head_kv
    groups of (n_head / n_head_kv query heads, one key head, one value head), which llama.cpp's converter stores as
    every query head, then every key head, then every value head. Falcon's groups are its key/value heads (one group
    for multi-query Falcon-7B: nothing moves); Bloom's are its heads (q, k, v interleaved per head)."""
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv or n_rows % (n_head + 2 * n_head_kv):
        raise NeuroAdaError(f"{n_rows} rows do not split into {n_head} query heads and {n_head_kv} key and value heads "
                            f"of one size", rule="4.2")
    groups = np.arange(n_rows).reshape(n_head_kv, n_head // n_head_kv + 2, -1)
    return np.concatenate([groups[:, :-2].reshape(-1), groups[:, -2].reshape(-1), groups[:, -1].reshape(-1)])


@dataclass
class Mapped:
    """Where one target lives in the GGUF file and how its rows are ordered there."""
    target: str
    gguf_name: str
    perm: np.ndarray | None   # gguf row i holds HF row perm[i]; None: same order
    inverse: np.ndarray | None
    transposed: bool = False  # the checkpoint holds this weight as [d_in, d_out] (TRANSPOSED)


class GGUFBase:
    """The base interface (like neuroada_format.base.Checkpoint) over a GGUF file, keyed by Hugging Face
    names: `info` gives the dtype of the values the file represents (the stored float type, or F32 for a
    block-quantized tensor, which decodes exactly to f32) and the canonical [d_out, d_in] shape;
    `array` gives those values in Hugging Face row order (the rope permutation undone).

    There is no `structure_hash`: the spec defines it over safetensors names and dtypes, which a GGUF
    file does not have, so warning 4.5 does not apply.
    """

    def __init__(self, file: GGUFFile | GGUFSet):
        self.file = file
        self.path = file.path
        arch = file.kv.get("general.architecture")
        # optional until a key must be mapped: a file's own tensor names work without it (section 15.2)
        self.arch = arch if isinstance(arch, str) else None
        self._map = None
        self._reverse = None
        self._resolved: dict[str, Mapped | None] = {}

    # name mapping
    def _name_map(self):
        if self._map is None:
            if self.arch is None:
                raise NeuroAdaError(f"general.architecture is missing or not a string, so only the file's own "
                                    f"tensor names can be targets (a Hugging Face key needs the name table of one "
                                    f"of {', '.join(ARCHS)})", path=self.path, rule="4.1")
            if self.arch not in ARCHS:
                raise NeuroAdaError(f"architecture {self.arch!r} has no Hugging Face name mapping here "
                                    f"(supported: {', '.join(ARCHS)})", path=self.path, rule="4.1")
            arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch), None)
            if arch_enum is None:  # the installation's problem, not the file's: gguf-py older than the architecture
                raise NeuroAdaUsageError(f"the installed gguf package ({_gguf_version()}) has no name table for "
                                         f"architecture {self.arch!r}; upgrade it: pip install -U gguf",
                                         path=self.path)
            blocks = self.file.kv.get(f"{self.arch}.block_count")
            if not isinstance(blocks, int) or isinstance(blocks, bool) or not 0 < blocks < 100_000:
                raise self.file.err(f"{self.arch}.block_count is missing or not a small integer")
            # gguf-py builds its table for every block up to the count (2 s and 90 MB a thousand): ours covers the
            # blocks the file's tensors name, so neither a 4-byte count of 99,999 nor one tensor named blk.99998.x
            # in a hostile file costs more than the file's own size
            named = {int(m.group(1)) for m in map(_BLOCK_NAME.match, self.file.tensors) if m}
            self._map = name_table(arch_enum, sorted(b for b in named if b < blocks))
        return self._map

    def _heads(self, key: str, default=None) -> int:
        v = self.file.kv.get(f"{self.arch}.{key}", default)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise self.file.err(f"{self.arch}.{key} is missing or not a positive integer")
        return v

    def resolve(self, name: str) -> Mapped | None:
        """The GGUF tensor of a Hugging Face target name (or of a GGUF name itself); None when absent."""
        if name in self._resolved:
            return self._resolved[name]
        found = None
        if name in self.file.tensors:
            found = Mapped(name, name, None, None)
        else:
            text = self._text(name)
            gname = self._name_map().get_name(text, try_suffixes=(".weight", ".bias"))
            if gname is not None and gname in self.file.tensors and \
                    not any(f".{kind}." in gname for kind in RESHAPED.get(self.arch, ())):
                stem = text.rsplit(".", 1)[0] if text.endswith((".weight", ".bias")) else text
                try:  # (what is wrong with the heads is said of this file and tensor, as every other base error)
                    perm = self._row_order(stem, gname, text.endswith(".bias"))
                except NeuroAdaError as exc:
                    raise NeuroAdaError(exc.detail, path=self.file.path, tensor=gname, rule=exc.rule) from None
                found = Mapped(name, gname, perm, None if perm is None else np.argsort(perm),
                               text.endswith(".weight") and gname.split(".")[-2] in TRANSPOSED.get(self.arch, ()))
        self._resolved[name] = found
        return found

    def _text(self, name: str) -> str:
        """The key as llama.cpp's converter looks it up in the table (TEXT_PREFIXES dropped)."""
        return next((new + name[len(old):] for old, new in TEXT_PREFIXES.get(self.arch, ()) if name.startswith(old)),
                    name)

    def _row_order(self, stem: str, gname: str, bias: bool) -> np.ndarray | None:
        """The permutation llama.cpp's converter applied to the rows of the tensor a key's stem names (None: none)."""
        reorder = ARCHS[self.arch]
        kind = gname.split(".")[-2]
        n_rows = self.file.tensors[gname].shape[0]
        if reorder == "rope" and stem.endswith(("q_proj", "k_proj")) and kind in ("attn_q", "attn_k"):
            # exactly the Hugging Face q_proj/k_proj tensors (by their name's ending); aliases already stored in rope
            # order (q_proj_no_perm, Meta's attention.wq) are not
            n_head = self._heads("attention.head_count")
            if kind == "attn_k":
                n_head = self._heads("attention.head_count_kv", n_head)
            perm = rope_permutation(n_rows, n_head)
            given = f"{self.arch}.attention.head_count_kv" in self.file.kv
            self._check_heads(gname, n_rows, n_head, "attention.head_count" + (
                "" if kind == "attn_q" else "_kv" if given else ", there being no head_count_kv"))
            return perm
        if reorder == "qkv" and stem.endswith("query_key_value") and kind == "attn_qkv":
            n_head = self._heads("attention.head_count")
            if self.arch == "bloom":  # one group per head; the converter writes head_count_kv = head_count
                if self._heads("attention.head_count_kv", n_head) != n_head:
                    raise self.file.err("bloom.attention.head_count_kv differs from head_count: llama.cpp's Bloom "
                                        "converter writes them equal and regroups the qkv rows by head_count", gname)
                perm = qkv_permutation(n_rows, n_head, n_head)
                self._check_heads(gname, n_rows, 3 * n_head, "attention.head_count (query, key and value)")
                return perm
            if bias:  # the converter's reorder cannot take one (it views the tensor as 2-D) and llama.cpp loads none
                raise NeuroAdaError("llama.cpp's Falcon converter writes no query_key_value bias and llama.cpp loads "
                                    "none, so the row order of this one is not known", rule="4.1")
            n_kv = self._heads("attention.head_count_kv")
            perm = qkv_permutation(n_rows, n_head, n_kv)
            self._check_heads(gname, n_rows, n_head + 2 * n_kv, "attention.head_count + 2 * head_count_kv")
            return None if (perm == np.arange(n_rows)).all() else perm  # one group (Falcon-7B): nothing moved
        return None

    def _check_heads(self, gname: str, n_rows: int, heads: int, what: str) -> None:
        """The rows a permutation splits into heads are as many as llama.cpp's loader requires of the tensor: heads
        of attention.key_length values, else of embedding_length / head_count (where the file gives neither, nothing to
        check). A head count that only divides the rows (one key head for two, say) made a permutation for other heads:
        the probe hash blamed the adapter, and --no-verify put its deltas on other rows."""
        kv = self.file.kv
        size, source = kv.get(f"{self.arch}.attention.key_length"), "attention.key_length"
        if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
            embd, n_head = kv.get(f"{self.arch}.embedding_length"), kv.get(f"{self.arch}.attention.head_count")
            if not (isinstance(embd, int) and not isinstance(embd, bool) and embd > 0 and isinstance(n_head, int)
                    and n_head > 0):
                return
            size, source = embd / n_head, f"embedding_length {embd} / head_count {n_head}"
        if n_rows != heads * size:  # (rule 4.2, as rows that do not split into the heads: reported per target)
            raise NeuroAdaError(f"{n_rows} rows, but the metadata says {heads} heads ({self.arch}.{what}) of {size:g} "
                                f"values ({source}): the GGUF file contradicts itself (llama.cpp refuses to load it), "
                                f"so its row order is not known", rule="4.2")

    # the base interface
    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def keys(self) -> list[str]:
        """Every tensor, by its Hugging Face name where the architecture's table has one (so that
        `neuroada-pack --base model.gguf` pairs it with a fine-tuned checkpoint), else its GGUF name."""
        if self.arch not in ARCHS:
            return list(self.file.tensors)
        if self._reverse is None:  # gguf's table lists many aliases per tensor; transformers' start with model.
            self._reverse = {}
            prefixes = KEY_PREFIXES.get(self.arch, ("model.", "lm_head"))
            for key, (_, gname) in self._name_map().mapping.items():
                if key.startswith(prefixes) and gname not in self._reverse:
                    self._reverse[gname] = key
            for gname, key in OUTER_KEYS_OF.get(self.arch, {}).items():
                if self._name_map().get_name(self._text(key)) == gname:
                    self._reverse[gname] = key
            own = BLOCK_KEYS_OF.get(self.arch, BLOCK_KEYS)
            marker, renamed = NEW_DECODER_KEYS.get(self.arch, (None, {}))
            for gname in list(self._reverse):
                blk, _, layer_kind = gname.partition(".")[2].partition(".")
                if gname.startswith("blk.") and layer_kind in own:
                    part = own[layer_kind]
                    if layer_kind in renamed and f"blk.{blk}.{marker}.weight" in self.file.tensors:
                        part = renamed[layer_kind]
                    key = f"{BLOCK_PREFIX.get(self.arch, 'model.layers.')}{blk}.{part}"
                    if self._name_map().get_name(self._text(key)) == gname:  # the table agrees: never another tensor
                        self._reverse[gname] = key
        out = []
        for g in self.file.tensors:
            stem, _, suffix = g.rpartition(".")
            hf = self._reverse.get(stem)
            name = f"{hf}.{suffix}" if hf else g
            try:
                same = self.resolve(name) is not None and self.resolve(name).gguf_name == g
            except NeuroAdaError:  # a key this file cannot map (a Falcon qkv bias: row order unknown) keeps its name
                same = False
            out.append(name if same else g)
        return out

    def probed(self, name: str, indices: np.ndarray) -> np.ndarray:
        """The base values at an adapter's canonical (row, column) positions ([d_out, k], f32), in Hugging Face
        row order: what the probe hash covers, read without decoding the rest of the tensor."""
        m = self.resolve(name)
        idx = np.asarray(indices, dtype=np.int64)
        rows = np.arange(idx.shape[0], dtype=np.int64) if m.inverse is None else m.inverse.astype(np.int64)
        return self.file.values_at(m.gguf_name, np.broadcast_to(rows[:, None], idx.shape), idx)

    def storage_name(self, name: str) -> str:
        """The GGUF tensor a key names: a file name and its Hugging Face key (or two aliases) may name one."""
        return self.resolve(name).gguf_name

    def encoding(self, name: str) -> str:
        return self.file.tensors[self.resolve(name).gguf_name].type.name

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        m = self.resolve(name)
        t = self.file.tensors[m.gguf_name]
        # a type without a binary32 decoding is named as it is (I32, Q8_K): rule 4.2 for a target on it, before 4.6
        dtype = FLOAT_TYPES.get(t.type, "F32") if decodable(t.type) else t.type.name
        return dtype, (t.shape[::-1] if m.transposed else t.shape)

    def array(self, name: str) -> np.ndarray:
        m = self.resolve(name)
        values = self.file.decode(m.gguf_name)
        values = values if m.perm is None else values[m.inverse]
        return values.T if m.transposed else values


def open_gguf_base(path) -> GGUFBase:
    """A GGUF file as a base for `neuroada_format.validate` (rules 4.1-4.4 on de-quantized values); the first shard
    of a split set is the whole set, as llama.cpp reads it (gguf_split)."""
    return GGUFBase(read_gguf_or_set(path))
