"""Give a block-FP8 checkpoint smaller quantization blocks, exactly.

In:  a Hugging Face model folder quantized in blocks (DeepSeek-V3/R1 style): every FP8
     `X.weight` [N, K] has an `X.weight_scale_inv` [ceil(N/bn), ceil(K/bk)] and config.json says
     `quantization_config.weight_block_size: [bn, bk]` (usually [128, 128]).
Out: a new folder where every scale is repeated (bn/bn') x (bk/bk') times and trimmed to
     [ceil(N/bn'), ceil(K/bk')], and config.json says [bn', bk'].  The FP8 bytes are not touched,
     so every weight dequantizes to exactly the same value; only the block grid gets finer, which
     lets SGLang/vLLM split layers over more tensor-parallel ranks (TP32 for DeepSeek-V3 at 64x64).

The tool reads top-down: validate and plan from the safetensors headers alone (no tensor data),
then write each shard by streaming (new header, new scales, every other byte copied straight from
the source, shared with it on copy-on-write filesystems), then check what was written.

    resize-block-size /models/DeepSeek-V3                  # -> /models/DeepSeek-V3-Block64x64
    resize-block-size /models/DeepSeek-V3 --block-size 32 -o /fast/DeepSeek-V3-b32
    resize-block-size /models/DeepSeek-V3 --tp 32 --dry-run
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import signal
import stat
import struct
import sys
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


__version__ = "0.1.0"
PROG = "resize-block-size"

# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

# Bits per element of every dtype the safetensors format defines (sub-byte types included so a
# header using them is read correctly even though they are never scales or resized).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}
SCALE_DTYPES = {"F32", "BF16", "F16", "F64", "F8_E8M0"}
SCALE_SUFFIX = "_scale_inv"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
STATE_DIR = ".resize_block_size"      # inside OUTPUT while a run is unfinished
MAX_HEADER_BYTES = 100_000_000        # the limit the safetensors library itself enforces
MIN_BLOCK = 16                        # engine GEMM kernels (tl.dot) need K tiles of >= 16
# Output data is laid out so that large unchanged byte runs keep their source offset modulo this,
# which lets XFS/btrfs share them (reflink). 4096 is the block size of every common filesystem;
# a fixed value keeps the output bytes independent of where the tool runs.
ALIGN = 4096
COPY_CHUNK = 64 << 20                 # bytes per copy call: bounds latency of Ctrl-C and progress
BUFFER_BYTES = 8 << 20                # the fallback copy loop's only buffer
# Bytes per O_DIRECT write. While one runs, its mapped source pages count in the process RSS, so
# this bounds memory; 32 MiB was as fast as 64 MiB and faster than 16 MiB here (bench/RESULTS.md).
DIRECT_CHUNK = 32 << 20


class ConversionError(Exception):
    """A problem the user can act on; printed as one line, exit code 1."""


class Interrupted(Exception):
    """Raised in worker threads when the main thread asks them to stop."""


def _fail(where: object, problem: str) -> ConversionError:
    return ConversionError(f"{where}: {problem}".replace("\n", " "))


# ---------------------------------------------------------------------------------------------
# Block math: pure functions
# ---------------------------------------------------------------------------------------------

def parse_block_size(text: str) -> tuple[int, int]:
    """Parse a block size given on the command line.

    >>> parse_block_size("64"), parse_block_size("64x64"), parse_block_size("64,128")
    ((64, 64), (64, 64), (64, 128))
    """
    parts = [p for p in re.split(r"[x,X\s]+", text.strip()) if p]
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise ConversionError(
            f"--block-size {text!r}: expected one or two positive integers, like 64, 64x64 or 64,128")
    sizes = [int(p) for p in parts]
    if min(sizes) <= 0:
        raise ConversionError(f"--block-size {text!r}: block sizes must be positive")
    return (sizes[0], sizes[-1])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale shape every engine expects for a weight of `shape` quantized in `block`s.

    Leading dims (stacked experts) are kept; the last two are divided, rounding up.

    >>> scale_shape((576, 7168), (128, 128)), scale_shape((576, 7168), (64, 64))
    ((5, 56), (9, 112))
    """
    *lead, n, k = shape
    return (*lead, -(-n // block[0]), -(-k // block[1]))


# Scales are replicated as raw elements (an array of unsigned ints of the dtype's width), which is
# exact for every float format. The standard library's array slicing does this at C speed; torch
# (repeat_interleave) gives the same bytes but its import alone costs ~1 s and ~200 MB per run,
# more than converting a whole shard takes on copy-on-write filesystems.
_TYPECODE = {1: "B", 2: "H", 4: "I", 8: "Q"}


def expand_scale(scale: array, shape: tuple[int, ...], factor: tuple[int, int],
                 new_shape: tuple[int, ...]) -> array:
    """Repeat every element of `scale` (row-major, `shape`) `factor[0]` times down and
    `factor[1]` times across, then trim to `new_shape`: torch's
    `repeat_interleave(f0, -2).repeat_interleave(f1, -1)[..., :n, :k]`.

    >>> expand_scale(array("I", [1, 2, 3, 4]), (2, 2), (2, 2), (3, 3)).tolist()
    [1, 1, 2, 1, 1, 2, 3, 3, 4]
    """
    *lead, rows, cols = shape
    new_rows, new_cols = new_shape[-2:]
    f0, f1 = factor
    # Across: every element f1 times, for all rows at once (k, k + f1, ... of the flat array).
    wide = array(scale.typecode, bytes(len(scale) * f1 * scale.itemsize))
    for k in range(f1):
        wide[k::f1] = scale
    # Down: each row (trimmed to new_cols) f0 times, again by slice assignment, on a list of rows.
    flat, step, width = wide.tobytes(), cols * f1 * scale.itemsize, new_cols * scale.itemsize
    lines = [flat[i: i + width] for i in range(0, len(flat), step)]
    repeated = [b""] * (len(lines) * f0)
    for j in range(f0):
        repeated[j::f0] = lines
    extra = rows * f0 - new_rows                # rows past the edge, at the end of each matrix
    if extra:
        for m in reversed(range(math.prod(lead))):
            end = (m + 1) * rows * f0
            del repeated[end - extra: end]
    return array(scale.typecode, b"".join(repeated))


def shrink_scale(scale: array, shape: tuple[int, ...], factor: tuple[int, int],
                 new_shape: tuple[int, ...]) -> array | None:
    """The inverse of `expand_scale`: every `factor`-th element down and across, or None if
    `scale` is not exactly the replication of those (then shrinking would lose information).

    >>> shrink_scale(array("I", [1, 1, 2, 1, 1, 2, 3, 3, 4]), (3, 3), (2, 2), (2, 2)).tolist()
    [1, 2, 3, 4]
    >>> shrink_scale(array("I", [1, 5]), (1, 2), (1, 2), (1, 1)) is None
    True
    """
    *lead, rows, cols = shape
    out = array(scale.typecode)
    for m in range(math.prod(lead)):
        for row in range(0, rows, factor[0]):
            start = (m * rows + row) * cols
            out += scale[start: start + cols: factor[1]]
    if len(out) != math.prod(new_shape) or expand_scale(out, new_shape, factor, shape) != scale:
        return None
    return out


def resize_scale_bytes(raw: bytes, dtype: str, old_shape: tuple[int, ...], new_shape: tuple[int, ...],
                       old_block: tuple[int, int], new_block: tuple[int, int]) -> bytes | None:
    """A scale's raw bytes for `new_block`: expanded when the block shrinks, shrunk (None if the
    scale is not a replication) when it grows. Any dtype: only whole elements are copied.

    >>> resize_scale_bytes(bytes([1, 2]), "F8_E8M0", (1, 2), (2, 3), (128, 128), (64, 64))
    b'\\x01\\x01\\x02\\x01\\x01\\x02'
    """
    if math.prod(new_shape) == 0 or math.prod(old_shape) == 0:
        return b""
    old = array(_TYPECODE[DTYPE_BITS[dtype] // 8])
    old.frombytes(raw)
    if new_block[0] <= old_block[0] and new_block[1] <= old_block[1]:
        new = expand_scale(old, old_shape, (old_block[0] // new_block[0], old_block[1] // new_block[1]), new_shape)
    else:
        new = shrink_scale(old, old_shape, (new_block[0] // old_block[0], new_block[1] // old_block[1]), new_shape)
    return None if new is None else new.tobytes()


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor takes in a safetensors file.

    >>> tensor_nbytes("F32", (9, 112)), tensor_nbytes("F8_E4M3", (576, 7168))
    (4032, 4128768)
    """
    return math.prod(shape) * DTYPE_BITS[dtype] // 8


def block_name(block: tuple[int, int]) -> str:
    """How blocks are named in messages and folder names.

    >>> block_name((64, 128))
    '64x128'
    """
    return f"{block[0]}x{block[1]}"


# ---------------------------------------------------------------------------------------------
# Reading: config.json and safetensors headers (8-byte little-endian length, then JSON)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard header; `begin`/`end` are absolute byte offsets in the file."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class ShardHeader:
    name: str                       # file name relative to the checkpoint folder
    path: Path
    size: int
    metadata: dict[str, str] | None
    tensors: list[TensorEntry]      # in data order
    prefix: bytes                   # the file's first bytes: 8-byte length + header JSON


def _read_json_file(path: Path, label: str) -> tuple[str, object]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _fail(path, f"{label} is not UTF-8 text")
    except OSError as e:
        raise _fail(path, f"cannot read {label}: {e.strerror}")
    try:
        return text, json.loads(text)
    except ValueError as e:
        raise _fail(path, f"{label} is not valid JSON ({e}); fix or re-download it")


def read_source_block(config: object, path: Path) -> tuple[int, int]:
    """The block size a config.json declares, after checking it is a block-FP8 checkpoint."""
    if not isinstance(config, dict):
        raise _fail(path, "config.json is not a JSON object")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise _fail(path, "no quantization_config: this model is not quantized, there are no blocks to resize")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        raise _fail(path, "quant_method is 'compressed-tensors' (llm-compressor FP8_BLOCK, `weight_scale`): "
                          "not supported; this tool converts quant_method 'fp8' checkpoints with weight_scale_inv")
    if method != "fp8":
        raise _fail(path, f"quant_method is {method!r}, expected 'fp8' (block-FP8 with weight_scale_inv); "
                          "this checkpoint format is not supported")
    if "weight_block_size" not in qc or qc["weight_block_size"] is None:
        raise _fail(path, "quantization_config has no weight_block_size: this FP8 checkpoint is not "
                          "block-quantized, there are no blocks to resize")
    block = qc["weight_block_size"]
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise _fail(path, f"weight_block_size is {json.dumps(block)}, expected two positive integers like [128, 128]")
    return (block[0], block[1])


def read_shard_header(path: Path, name: str) -> ShardHeader:
    """Read and check a safetensors header without touching tensor data.

    Every tensor must have a known dtype, a byte length matching its shape, and the tensors must
    tile the data area exactly (no hole, no overlap, nothing missing at the end).
    """
    where = name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if size < 8 or len(prefix) < 8:
                raise _fail(where, f"file is {size} bytes, too short to be a safetensors file; re-download it")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _fail(where, f"header length {header_len} is above the 100 MB safetensors limit; "
                                   "the file is corrupt, re-download it")
            if 8 + header_len > size:
                raise _fail(where, f"header length {header_len} runs past the end of the {size}-byte file; "
                                   "the file is truncated or corrupt, re-download it")
            raw = f.read(header_len)
    except OSError as e:
        raise _fail(where, f"cannot read: {e.strerror}")
    return parse_shard_header(path, name, size, prefix + raw)


def parse_shard_header(path: Path, name: str, size: int, prefix: bytes) -> ShardHeader:
    """Check a shard's prefix (8-byte length + header JSON) against a file of `size` bytes."""
    where = name
    header_len, raw = len(prefix) - 8, prefix[8:]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _fail(where, "header is not valid JSON; the file is corrupt, re-download it")
    if not isinstance(header, dict):
        raise _fail(where, "header is not a JSON object; the file is corrupt, re-download it")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _fail(where, "__metadata__ must map strings to strings; the file is corrupt")
    data_start = 8 + header_len
    tensors = []
    for tname, info in header.items():
        tensors.append(_tensor_entry(where, tname, info, data_start))
    tensors.sort(key=lambda t: (t.begin, t.end))
    cursor = data_start
    for t in tensors:
        if t.end > size:
            raise _fail(where, f"{t.name}: data runs past the end of the file (to byte {t.end} of {size}); "
                               "the file is truncated or corrupt, re-download it")
        if t.begin < cursor:
            raise _fail(where, f"{t.name}: data overlaps the previous tensor; the file is corrupt")
        if t.begin > cursor:
            raise _fail(where, f"{t.name}: {t.begin - cursor} unused bytes before this tensor's data; "
                               "safetensors loaders reject holes, the file is corrupt")
        cursor = t.end
    if cursor != size:
        raise _fail(where, f"tensor data ends at byte {cursor} but the file has {size} bytes; "
                           "the file is truncated or corrupt, re-download it")
    return ShardHeader(name, path, size, metadata, tensors, prefix)


def _tensor_entry(where: str, name: str, info: object, data_start: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise _fail(where, f"{name}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise _fail(where, f"{name}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise _fail(where, f"{name}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _fail(where, f"{name}: data_offsets {offsets!r} are not two increasing non-negative integers")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise _fail(where, f"{name}: holds {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs "
                           f"{bits / 8:g}; the file is corrupt")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


# ---------------------------------------------------------------------------------------------
# Planning: everything the writer does, decided from headers alone
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScaleResize:
    """How one scale tensor changes: from `old_block` to `new_block` (either may be larger)."""
    weight: str
    weight_shape: tuple[int, ...]
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    old_block: tuple[int, int]
    new_block: tuple[int, int]

    def reversed(self) -> ScaleResize:
        return ScaleResize(self.weight, self.weight_shape, self.new_shape, self.old_shape,
                           self.new_block, self.old_block)


@dataclass(frozen=True)
class Piece:
    """One tensor of an output shard: copied from `src_begin..src_end`, or a resized scale."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    src_begin: int
    src_end: int
    out_begin: int                  # absolute offset in the output file
    out_end: int
    resize: ScaleResize | None = None


@dataclass(frozen=True)
class CopyRun:
    """Adjacent unchanged tensors, copied (or shared) as one byte range."""
    src: int
    dst: int
    length: int


@dataclass
class ShardPlan:
    name: str
    source: Path
    source_size: int
    header: bytes                   # the complete output prefix: 8-byte length + padded JSON
    pieces: list[Piece]
    out_size: int

    @property
    def scales(self) -> list[Piece]:
        return [p for p in self.pieces if p.resize]

    def copy_runs(self) -> list[CopyRun]:
        runs: list[CopyRun] = []
        for p in self.pieces:
            if p.resize or p.src_end == p.src_begin:
                continue
            last = runs[-1] if runs else None
            if last and last.src + last.length == p.src_begin and last.dst + last.length == p.out_begin:
                runs[-1] = CopyRun(last.src, last.dst, last.length + p.src_end - p.src_begin)
            else:
                runs.append(CopyRun(p.src_begin, p.out_begin, p.src_end - p.src_begin))
        return runs

    def shareable_bytes(self) -> int:
        """Bytes copy-on-write can share: whole aligned blocks of runs at congruent offsets."""
        return sum(_aligned_span(r)[1] for r in self.copy_runs())


@dataclass
class OtherFile:
    relpath: str                    # POSIX-style path inside the checkpoint folder
    source: Path
    size: int


@dataclass
class Plan:
    input_dir: Path
    output_dir: Path
    source_block: tuple[int, int]
    target_block: tuple[int, int]
    shards: list[ShardPlan]
    config_text: str                # the new config.json, written last
    index_text: str | None          # the new index, if the input has one
    other_files: list[OtherFile]
    fp8_weights: int
    fingerprint: str                # identifies this conversion, for resuming

    @property
    def scale_count(self) -> int:
        return sum(len(s.scales) for s in self.shards)

    @property
    def bytes_out(self) -> int:
        return (sum(s.out_size for s in self.shards) + sum(f.size for f in self.other_files)
                + len(self.config_text.encode()) + len((self.index_text or "").encode()))


def check_target_block(source: tuple[int, int], target: tuple[int, int]) -> None:
    """Refuse a target the scales cannot be resized to exactly.

    Smaller blocks must divide the source block. Larger ones (going back, e.g. 64 -> 128) must be
    whole multiples of it, and are later checked to be replications.
    """
    if target == source:
        raise ConversionError(f"the checkpoint already uses {block_name(source)} blocks: nothing to convert "
                              "(was it converted already?)")
    smaller = all(t <= s for s, t in zip(source, target))
    larger = all(t >= s for s, t in zip(source, target))
    for s, t in zip(source, target):
        if t < MIN_BLOCK:
            raise ConversionError(f"--block-size {block_name(target)}: blocks below {MIN_BLOCK} are not "
                                  "supported by the engines' block-FP8 kernels")
        if smaller and s % t:
            raise ConversionError(f"--block-size {block_name(target)} does not divide the checkpoint's "
                                  f"{block_name(source)} blocks; pick a divisor such as {s // 2}")
        if larger and t % s:
            raise ConversionError(f"--block-size {block_name(target)} is larger than the checkpoint's "
                                  f"{block_name(source)} blocks but not a multiple of them")
    if not (smaller or larger):
        raise ConversionError(f"--block-size {block_name(target)} makes one dim of the checkpoint's "
                              f"{block_name(source)} blocks smaller and the other larger; do one at a time")


def find_shards(input_dir: Path) -> tuple[list[str], dict | None, Path | None]:
    """Shard file names to convert, and the parsed index if there is one."""
    names = sorted(p.name for p in input_dir.iterdir()
                   if p.name.endswith(".safetensors") and p.is_file())
    index_path = input_dir / INDEX_NAME
    index = None
    if index_path.exists():
        _, index = _read_json_file(index_path, INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise _fail(INDEX_NAME, "has no weight_map of tensor names to shard files; fix or re-download it")
        present = set(names)                      # one stat per shard, not per tensor (~91k)
        for tensor, shard in weight_map.items():
            if shard in present:
                continue
            if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise _fail(INDEX_NAME, f"{tensor}: shard name {shard!r} is not a plain file name in the "
                                        "model folder; refusing to follow it")
            if not (input_dir / shard).is_file():
                raise _fail(INDEX_NAME, f"{tensor}: names shard {shard}, which is missing from the folder; "
                                        "the download is incomplete")
    if not names:
        raise _fail(input_dir, "no .safetensors files found; is this the model folder?")
    return names, index, index_path if index is not None else None


@dataclass(frozen=True)
class ScalePair:
    """An FP8 weight and its block scale, possibly in different shards."""
    weight: TensorEntry
    scale: TensorEntry
    scale_shard: str


def pair_scales(headers: list[ShardHeader], source: tuple[int, int]) -> tuple[dict[str, ScalePair], int]:
    """Match every `X_scale_inv` with `X`, across shards, and check both shapes for `source` blocks.

    Returns the pairs by scale name and the number of FP8 weights.
    """
    where: dict[str, tuple[str, TensorEntry]] = {}
    for h in headers:
        for t in h.tensors:
            if t.name in where:
                raise _fail(h.name, f"{t.name}: also stored in {where[t.name][0]}; a tensor must be in one shard")
            where[t.name] = (h.name, t)
    pairs: dict[str, ScalePair] = {}
    fp8 = 0
    for h in headers:
        for t in h.tensors:
            if t.name.endswith(SCALE_SUFFIX):
                weight = where.get(t.name[: -len(SCALE_SUFFIX)])
                _check_scale(h.name, t, weight and weight[1], source)
                pairs[t.name] = ScalePair(weight[1], t, h.name)
            elif t.dtype in FP8_DTYPES:
                fp8 += 1
                if t.name + SCALE_SUFFIX not in where:
                    hint = (" (found a compressed-tensors style `_scale` instead)"
                            if t.name + "_scale" in where else "")
                    raise _fail(h.name, f"{t.name}: FP8 tensor without {t.name + SCALE_SUFFIX}{hint}; "
                                        "cannot resize its blocks, the checkpoint is incomplete or not block-FP8")
    return pairs, fp8


def _check_scale(shard: str, scale: TensorEntry, w: TensorEntry | None, source: tuple[int, int]) -> None:
    name = scale.name
    if w is None:
        raise _fail(shard, f"{name}: scale without its weight {name[: -len(SCALE_SUFFIX)]}; "
                           "the checkpoint is incomplete or renamed")
    if w.dtype not in FP8_DTYPES:
        raise _fail(shard, f"{name}: its weight {w.name} is {w.dtype}, not FP8; refusing to guess what it means")
    if scale.dtype not in SCALE_DTYPES:
        raise _fail(shard, f"{name}: scale dtype {scale.dtype} is not a float scale format "
                           f"({', '.join(sorted(SCALE_DTYPES))})")
    if len(w.shape) < 2:
        raise _fail(shard, f"{name}: its weight {w.name} has shape {list(w.shape)}; block scales need a 2-D "
                           "(or stacked 3-D) weight")
    expected = scale_shape(w.shape, source)
    if len(scale.shape) != len(w.shape):
        raise _fail(shard, f"{name}: scale shape {list(scale.shape)} has {len(scale.shape)} dims but weight "
                           f"{list(w.shape)} has {len(w.shape)}; expected {list(expected)}")
    if scale.shape != expected:
        raise _fail(shard, f"{name}: scale shape {list(scale.shape)} does not match weight {list(w.shape)} "
                           f"at {block_name(source)} blocks (expected {list(expected)}); "
                           "is weight_block_size in config.json right?")


def plan_shard(header: ShardHeader, resizes: dict[str, ScaleResize]) -> ShardPlan:
    """Lay out one output shard: same tensors in the same order, resized scales, aligned runs."""
    pieces, offset = [], 0
    for t in header.tensors:
        r = resizes.get(t.name)
        shape = r.new_shape if r else t.shape
        length = tensor_nbytes(t.dtype, shape)
        pieces.append(Piece(t.name, t.dtype, shape, t.begin, t.end, offset, offset + length, r))
        offset += length
    metadata = dict(header.metadata or {})
    metadata.setdefault("format", "pt")
    entries: dict[str, object] = {"__metadata__": metadata}
    for p in pieces:
        entries[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [p.out_begin, p.out_end]}
    body = json.dumps(entries, separators=(",", ":")).encode()
    header_len = _padded_header_len(len(body), pieces)
    prefix = struct.pack("<Q", header_len) + body + b" " * (header_len - len(body))
    data_start = len(prefix)
    pieces = [Piece(p.name, p.dtype, p.shape, p.src_begin, p.src_end, p.out_begin + data_start,
                    p.out_end + data_start, p.resize) for p in pieces]
    return ShardPlan(header.name, header.path, header.size, prefix, pieces, data_start + offset)


def invert_shard(forward: ShardPlan, original: ShardHeader) -> ShardPlan:
    """The plan that turns `forward`'s output back into the `original` file, byte for byte."""
    where = {t.name: t for t in original.tensors}
    pieces = sorted((Piece(p.name, p.dtype, where[p.name].shape, p.out_begin, p.out_end,
                           where[p.name].begin, where[p.name].end, p.resize and p.resize.reversed())
                     for p in forward.pieces), key=lambda p: p.out_begin)
    return ShardPlan(forward.name, original.path, forward.out_size, original.prefix, pieces, original.size)


def _padded_header_len(json_len: int, pieces: list[Piece]) -> int:
    """Header length (JSON plus trailing spaces) that puts the most unchanged bytes at their source
    offset modulo ALIGN, keeping the data start 8-byte aligned as safetensors does."""
    weight: dict[int, int] = {}
    for p in pieces:
        if not p.resize:
            residue = (p.src_begin - 8 - p.out_begin) % ALIGN
            if residue % 8 == 0:
                weight[residue] = weight.get(residue, 0) + p.src_end - p.src_begin
    base = -(-json_len // 8) * 8
    if not weight:
        return base
    best = max(weight, key=lambda r: (weight[r], -r))
    return base + (best - base) % ALIGN


def _aligned_span(run: CopyRun) -> tuple[int, int]:
    """(offset into the run, length) of the part copy-on-write can share, or (0, 0)."""
    if (run.src - run.dst) % ALIGN:
        return (0, 0)
    head = -run.src % ALIGN
    length = (run.length - head) // ALIGN * ALIGN if run.length > head else 0
    return (head, length) if length > 0 else (0, 0)


def edit_json_text(text: str, key: str, value: object, expected: object) -> str:
    """Replace the value of `key` in JSON `text` in place, keeping every other character.

    Falls back to re-serializing only if no single occurrence gives the `expected` document.

    >>> edit_json_text('{"a": {"b": [128, 128]}}', "b", [64, 64], {"a": {"b": [64, 64]}})
    '{"a": {"b": [64, 64]}}'
    """
    pattern = re.compile(r'("%s"\s*:\s*)(\[[^\[\]]*\]|-?\d+)' % re.escape(key))
    for m in pattern.finditer(text):
        old = m.group(2)
        if isinstance(value, list) and old.startswith("["):
            numbers = iter(value)
            new = re.sub(r"-?\d+", lambda _: str(next(numbers)), old, count=len(value))
        else:
            new = json.dumps(value)
        candidate = text[: m.start(2)] + new + text[m.end(2):]
        try:
            if json.loads(candidate) == expected:
                return candidate
        except ValueError:
            pass
    return json.dumps(expected, indent=2) + "\n"


def list_other_files(input_dir: Path, skip: set[str]) -> list[OtherFile]:
    """Every file below the folder except the converted ones, following symlinks (a Hugging Face
    cache snapshot is a tree of links into ../../blobs)."""
    found: list[OtherFile] = []
    seen_dirs: set[str] = set()
    for root, dirs, files in os.walk(input_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:       # a symlink loop
            dirs[:] = []
            continue
        seen_dirs.add(real)
        rel_root = Path(root).relative_to(input_dir)
        # Our own state (only present mid --in-place) and git's object store (a second full copy of
        # the weights under git-lfs) are not part of the model.
        dirs[:] = sorted(d for d in dirs if not (rel_root == Path(".") and (d.startswith(STATE_DIR) or d == ".git")))
        for f in sorted(files):
            rel = (rel_root / f).as_posix()
            if rel in skip:
                continue
            path = Path(root) / f
            try:
                st = path.stat()
            except OSError:
                raise _fail(path, "is a broken symlink or unreadable; fix the download")
            if not stat.S_ISREG(st.st_mode):
                raise _fail(path, "is not a regular file (fifo, socket or device); remove it from the model folder")
            found.append(OtherFile(rel, path, st.st_size))
    return found


@dataclass
class Checkpoint:
    """A validated input folder, read from config.json, the index and the shard headers."""
    folder: Path
    config_text: str
    config: dict
    source_block: tuple[int, int]
    headers: list[ShardHeader]
    index_text: str | None
    index: dict | None
    pairs: dict[str, ScalePair]     # by scale name
    fp8_weights: int
    others: list[OtherFile]


def read_checkpoint(folder: Path) -> Checkpoint:
    """Validate a checkpoint folder from its metadata alone: config, index, every shard header,
    every weight/scale pair. Raises ConversionError naming the file (and tensor) at fault."""
    if not folder.exists():
        raise _fail(folder, "does not exist")
    if not folder.is_dir():
        raise _fail(folder, "is not a folder; give the model folder that holds config.json")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise _fail(folder, "has no config.json; give the Hugging Face model folder (the one with config.json "
                            "and the .safetensors shards)")
    config_text, config = _read_json_file(config_path, CONFIG_NAME)
    source = read_source_block(config, config_path)
    names, index, index_path = find_shards(folder)
    headers = [read_shard_header(folder / n, n) for n in names]
    if index is not None:
        held = {h.name: {t.name for t in h.tensors} for h in headers}
        for tensor, shard in index["weight_map"].items():
            if tensor not in held.get(shard, ()):
                raise _fail(INDEX_NAME, f"{tensor}: the index puts it in {shard}, which does not hold it; "
                                        "the index does not match the shards")
    pairs, fp8 = pair_scales(headers, source)
    skip = set(names) | {CONFIG_NAME} | ({INDEX_NAME} if index is not None else set())
    index_text = index_path.read_text(encoding="utf-8") if index_path else None
    return Checkpoint(folder, config_text, config, source, headers, index_text, index, pairs, fp8,
                      list_other_files(folder, skip))


def make_plan(ckpt: Checkpoint, output_dir: Path, target: tuple[int, int]) -> Plan:
    """Decide every byte of the output for `target` blocks."""
    source = ckpt.source_block
    check_target_block(source, target)
    resizes = {name: ScaleResize(p.weight.name, p.weight.shape, p.scale.shape,
                                 scale_shape(p.weight.shape, target), source, target)
               for name, p in ckpt.pairs.items()}
    shards = [plan_shard(h, resizes) for h in ckpt.headers]

    new_config = json.loads(ckpt.config_text)
    new_config["quantization_config"]["weight_block_size"] = list(target)
    config_text = edit_json_text(ckpt.config_text, "weight_block_size", list(target), new_config)
    index_text = ckpt.index_text
    meta = ckpt.index.get("metadata") if ckpt.index is not None else None
    if isinstance(meta, dict) and "total_size" in meta:
        new_index = json.loads(index_text)
        new_index["metadata"]["total_size"] = sum(p.out_end - p.out_begin for s in shards for p in s.pieces)
        index_text = edit_json_text(index_text, "total_size", new_index["metadata"]["total_size"], new_index)

    digest = hashlib.sha256()
    digest.update(json.dumps([os.path.realpath(ckpt.folder), list(source), list(target),
                              ckpt.config_text, index_text]).encode())
    for s in shards:
        digest.update(f"{s.name}:{s.source_size}:".encode() + s.header)
    for f in ckpt.others:
        digest.update(f"{f.relpath}:{f.size}".encode())
    return Plan(ckpt.folder, output_dir, source, target, shards, config_text, index_text, ckpt.others,
                ckpt.fp8_weights, digest.hexdigest())


# ---------------------------------------------------------------------------------------------
# Tensor-parallel advisor: which block each TP degree needs, from names and shapes alone
# ---------------------------------------------------------------------------------------------

TP_SIZES = (1, 2, 4, 8, 16, 32, 64)
BLOCK_EDGES = (128, 64, 32, 16)
# How SGLang and vLLM shard each projection (by the module name before `.weight`).
COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_b_proj", "kv_b_proj",
                   "gate_proj", "up_proj", "gate_up_proj", "w1", "w3"}
ROW_PARALLEL = {"o_proj", "down_proj", "w2", "out_proj"}
REPLICATED = {"q_a_proj", "kv_a_proj_with_mqa", "eh_proj", "gate",
              "wq_b", "wk", "weights_proj"}          # the last three: DeepSeek-V3.2's indexer
KV_PROJ = {"k_proj", "v_proj"}                       # split over min(TP, KV heads)


@dataclass(frozen=True)
class SplitRule:
    """Which dims of a weight tensor parallelism splits: rows (N), columns (K), both or none."""
    rows: bool
    cols: bool
    max_ways: int | None = None     # KV heads: the engines replicate them beyond this many ranks
    expert: bool = False            # a routed expert: not split under expert parallelism
    known: bool = True


def split_rule(name: str, kv_heads: int | None = None) -> SplitRule:
    """How tensor parallelism splits the weight `name`.

    >>> split_rule("model.layers.3.mlp.experts.7.down_proj.weight")
    SplitRule(rows=False, cols=True, max_ways=None, expert=True, known=True)
    """
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
    expert = ".experts." in name and ".shared_experts." not in name
    if leaf in COLUMN_PARALLEL:
        return SplitRule(True, False, kv_heads if leaf in KV_PROJ else None, expert)
    if leaf in ROW_PARALLEL:
        return SplitRule(False, True, None, expert)
    if leaf in REPLICATED:
        return SplitRule(False, False, None, expert)
    return SplitRule(True, True, None, expert, known=False)


def split_failure(shape: tuple[int, ...], rule: SplitRule, tp: int, ep: bool,
                  block: tuple[int, int]) -> str | None:
    """Why `block` cannot serve this weight at `tp` ranks, or None if it can.

    >>> split_failure((18432, 7168), SplitRule(True, False), 32, False, (128, 128))
    '576 rows per rank are not a multiple of 128'
    >>> split_failure((18432, 7168), SplitRule(True, False), 32, False, (64, 64)) is None
    True
    """
    if rule.expert and ep:
        return None
    ways = min(tp, rule.max_ways) if rule.max_ways else tp
    for split, size, edge, what in ((rule.rows, shape[-2], block[0], "rows"), (rule.cols, shape[-1], block[1], "columns")):
        if not split:
            continue
        if size % ways:
            return f"{size} {what} do not split evenly over {ways} ranks"
        if (size // ways) % edge:
            return f"{size // ways} {what} per rank are not a multiple of {edge}"
    return None


def _kv_heads(config: dict) -> int | None:
    for c in (config, config.get("text_config") or {}):
        if isinstance(c, dict):
            heads = c.get("num_key_value_heads") or c.get("num_attention_heads")
            if isinstance(heads, int) and heads > 0:
                return heads
    return None


@dataclass
class TPAdvice:
    """The TP table of a checkpoint, with the weights that limit each entry."""
    weights: dict[tuple[tuple[int, ...], SplitRule], str]    # distinct (shape, rule) -> an example name
    source_block: tuple[int, int]
    unknown: list[str]

    def failure(self, tp: int, ep: bool, block: tuple[int, int]) -> str | None:
        """The first weight `block` cannot serve at `tp`, as a sentence, or None."""
        for (shape, rule), name in self.weights.items():
            why = split_failure(shape, rule, tp, ep, block)
            if why:
                return f"{name}: {why}"
        return None

    def best_edge(self, tp: int, ep: bool) -> int | None:
        """The largest square block edge that divides the source block and works at `tp`."""
        for edge in BLOCK_EDGES:
            if (all(b % edge == 0 for b in self.source_block)
                    and self.failure(tp, ep, (edge, edge)) is None):
                return edge
        return None

    def table(self, ep: bool) -> dict[str, int | None]:
        return {str(tp): self.best_edge(tp, ep) for tp in TP_SIZES}


def advise_tp(ckpt: Checkpoint) -> TPAdvice:
    """Collect every FP8 weight's split rule (distinct shapes only: 90k tensors, ~20 kinds)."""
    kv_heads = _kv_heads(ckpt.config)
    weights: dict[tuple[tuple[int, ...], SplitRule], str] = {}
    unknown: list[str] = []
    for pair in ckpt.pairs.values():
        rule = split_rule(pair.weight.name, kv_heads)
        if not rule.known:
            unknown.append(pair.weight.name)
        weights.setdefault((pair.weight.shape, rule), pair.weight.name)
    return TPAdvice(weights, ckpt.source_block, sorted(unknown))


def choose_block_for_tp(advice: TPAdvice, tp: int, ep: bool) -> tuple[int, int] | None:
    """The target block for `--tp`: None when the source block already works.

    Raises ConversionError when no block of 16 or more can serve this TP degree.
    """
    mode = f"TP{tp}" + (" with expert parallelism" if ep else "")
    if advice.failure(tp, ep, advice.source_block) is None:
        return None
    edge = advice.best_edge(tp, ep)
    if edge is None:
        smallest = min(e for e in BLOCK_EDGES if all(b % e == 0 for b in advice.source_block))
        raise ConversionError(f"no block size of {smallest} or more works at {mode}: "
                              f"{advice.failure(tp, ep, (smallest, smallest))}")
    return (edge, edge)


# ---------------------------------------------------------------------------------------------
# Copying bytes: copy-on-write clone, in-kernel copy, or a plain buffered loop
# ---------------------------------------------------------------------------------------------

# linux/fs.h: FICLONERANGE = _IOW(0x94, 13, struct file_clone_range {s64 src_fd; u64 src_offset,
# src_length, dest_offset}). Python has no binding for it; this is the whole of the "by hand" part.
FICLONERANGE = 0x4020940D
_KERNEL_REFUSES = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY,
                   errno.EPERM, errno.ETXTBSY}


def _source_changed(offset: int) -> ConversionError:
    return ConversionError(f"source file ended early at byte {offset}; was it changed during the run?")


def set_direct(fd: int, on: bool) -> None:
    """Turn O_DIRECT on or off for an open file (Linux allows it with F_SETFL)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))


def clone_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    """Share `length` bytes of src with dst (XFS, btrfs); offsets and length block-aligned."""
    fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("qQQQ", src_fd, src_off, length, dst_off))


class ByteCopier:
    """Copies byte ranges between files by the fastest method the filesystem accepts.

    `method` is one of:
    - "reflink": share whole aligned blocks with the source (XFS, btrfs), copy the ends in-kernel;
    - "direct": O_DIRECT writes from the source's page cache (see `_direct`), no page cache on
      the output side; never shares blocks;
    - "copy_file_range": in-kernel copy (it may share blocks where the filesystem can);
    - "buffered": read/write through one fixed buffer.
    "reflink" writes what it cannot share (ranges that do not line up) like "direct" where the
    filesystem takes O_DIRECT. A method the kernel refuses falls back for the rest of the run
    (reflink -> copy_file_range -> buffered; direct -> buffered, which never shares either); the
    bytes written are the same.
    """

    def __init__(self, method: str, on_bytes: Callable[[int], None] = lambda n: None,
                 stop: threading.Event | None = None):
        self.method = method
        self.on_bytes = on_bytes
        self.stop = stop or threading.Event()
        self.shared = 0
        self.copied = 0
        self.written = 0            # headers and scales, counted by `wrote`
        self._lock = threading.Lock()
        self._local = threading.local()
        self._direct_refused = False

    def copy(self, src_fd: int, dst_fd: int, run: CopyRun) -> None:
        head, shared = _aligned_span(run) if self.method == "reflink" else (0, 0)
        if not shared and self.method in ("reflink", "direct"):
            self._copy_direct(src_fd, dst_fd, run)
        elif shared:
            self._copy(src_fd, dst_fd, run.src, run.dst, head)
            done = 0
            while done < shared:      # chunks keep Ctrl-C and the progress bar responsive
                n = min(1 << 30, shared - done)
                self._check_stop()
                try:
                    clone_range(src_fd, dst_fd, run.src + head + done, run.dst + head + done, n)
                except OSError as e:
                    if e.errno not in _KERNEL_REFUSES:
                        raise
                    self.method = "copy_file_range"
                    break
                done += n
                self._count(n, shared=True)
            rest = head + done
            self._copy(src_fd, dst_fd, run.src + rest, run.dst + rest, run.length - rest)
        else:
            self._copy(src_fd, dst_fd, run.src, run.dst, run.length)

    def _copy_direct(self, src_fd: int, dst_fd: int, run: CopyRun) -> None:
        # O_DIRECT needs the output offset and length in whole blocks: the unaligned ends (under
        # 4 KiB each) are copied otherwise, by the buffered loop for "direct" (it never shares).
        small = "buffered" if self.method == "direct" else ""
        head = min(run.length, -run.dst % ALIGN)
        body = (run.length - head) // ALIGN * ALIGN
        self._copy(src_fd, dst_fd, run.src, run.dst, head, small)
        use_direct = body and not self._direct_refused
        done = head + (self._direct(src_fd, dst_fd, run.src + head, run.dst + head, body) if use_direct else 0)
        self._copy(src_fd, dst_fd, run.src + done, run.dst + done, run.length - done, small)

    def _direct(self, src_fd: int, dst_fd: int, src: int, dst: int, length: int) -> int:
        """Write `length` bytes (dst and length block-aligned) with O_DIRECT; returns how many were
        written, fewer only if the kernel refused: then O_DIRECT is not tried again, and the
        "direct" method becomes "buffered".

        Why by hand: with copy_file_range on ext4 every byte is copied into the output's page
        cache and then written back, and the fsync that makes a shard safe to rename waits for
        that writeback, so on one worker copying and writeback never overlap. An O_DIRECT write
        goes from the buffer to the disk and leaves no writeback. When source and output offsets
        agree modulo 4 KiB the buffer is the source's own page cache (a read-only mmap window),
        so no byte is copied by the CPU at all; otherwise one aligned buffer bounces the bytes.
        Measured on this machine, 4 GiB cached: 0.9-1.3 s against 2.8-4.1 s for copy_file_range + fsync
        (bench/RESULTS.md).
        """
        done = 0
        try:
            set_direct(dst_fd, True)
            while done < length:
                self._check_stop()
                n = min(DIRECT_CHUNK, length - done)
                if (src + done) % ALIGN == 0:
                    self._direct_from_source(src_fd, dst_fd, src + done, dst + done, n)
                else:
                    self._direct_through_buffer(src_fd, dst_fd, src + done, dst + done, n)
                done += n
                self._count(n, shared=False)
        except OSError as e:
            if e.errno == errno.EFAULT:      # an mmap page beyond the end of the source
                raise _source_changed(src + done) from None
            if e.errno not in _KERNEL_REFUSES:
                raise
            self._direct_refused = True
            if self.method == "direct":
                self.method = "buffered"
        finally:
            try:
                set_direct(dst_fd, False)
            except OSError:
                pass
        return done

    def _direct_from_source(self, src_fd: int, dst_fd: int, src: int, dst: int, n: int) -> None:
        start = src - src % mmap.ALLOCATIONGRANULARITY     # mmap offsets are whole pages
        try:
            window = mmap.mmap(src_fd, src + n - start, prot=mmap.PROT_READ, offset=start)
        except ValueError:                                  # "mmap length is greater than file size"
            raise _source_changed(src) from None
        except OSError:                                     # a source filesystem that cannot map
            self._direct_through_buffer(src_fd, dst_fd, src, dst, n)
            return
        with window:
            window.madvise(mmap.MADV_SEQUENTIAL)            # read ahead when it is not cached
            # Every view released on the way out, even on an error: mmap.close refuses otherwise.
            with memoryview(window) as whole, whole[src - start:] as part:
                _pwrite_all(dst_fd, part, dst)

    def _direct_through_buffer(self, src_fd: int, dst_fd: int, src: int, dst: int, n: int) -> None:
        if not hasattr(self._local, "aligned"):             # one page-aligned buffer per worker
            self._local.aligned = mmap.mmap(-1, DIRECT_CHUNK)
        with memoryview(self._local.aligned) as whole, whole[:n] as part:
            if os.preadv(src_fd, [part], src) != n:
                raise _source_changed(src)
            _pwrite_all(dst_fd, part, dst)

    def _copy(self, src_fd: int, dst_fd: int, src: int, dst: int, length: int, method: str = "") -> None:
        """In-kernel copy, or the buffered loop if `method` (default: the copier's) says so."""
        in_kernel = (method or self.method) != "buffered"
        end = src + length
        while src < end:
            self._check_stop()
            n = min(COPY_CHUNK, end - src)
            if in_kernel:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, n, src, dst)
                except OSError as e:
                    if e.errno not in _KERNEL_REFUSES:
                        raise
                    self.method = "buffered"
                    in_kernel = False
                    continue
            else:
                n = self._buffered(src_fd, dst_fd, src, dst, n)
            if n == 0:
                raise _source_changed(src)
            src, dst = src + n, dst + n
            self._count(n, shared=False)

    def _buffered(self, src_fd: int, dst_fd: int, src: int, dst: int, length: int) -> int:
        if not hasattr(self._local, "buf"):        # one buffer per worker thread
            self._local.buf = bytearray(BUFFER_BYTES)
        view = memoryview(self._local.buf)[: min(length, BUFFER_BYTES)]
        got = os.preadv(src_fd, [view], src)
        written = 0
        while written < got:
            written += os.pwrite(dst_fd, view[written:got], dst + written)
        return got

    @property
    def total(self) -> int:
        """Bytes that reached the output, however they got there."""
        return self.shared + self.copied + self.written

    def wrote(self, n: int) -> None:
        with self._lock:
            self.written += n
        self.on_bytes(n)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted()

    def _count(self, n: int, shared: bool) -> None:
        with self._lock:
            if shared:
                self.shared += n
            else:
                self.copied += n
        self.on_bytes(n)


COPY_METHODS = ("auto", "no-share", "reflink", "direct", "copy_file_range", "buffered")


def choose_copy_method(requested: str, source: Path | None, probe_dir: Path) -> str:
    """"auto" is "reflink" where a probe clone from `source` into `probe_dir` works, else "direct"
    where an O_DIRECT write into `probe_dir` works, else "copy_file_range" (which itself falls
    back to "buffered" if the kernel refuses). "no-share" (--no-reflink) must write real copies:
    "direct" never shares; without it, where cloning works copy_file_range would share aligned
    ranges too, so it is "buffered" there."""
    if requested not in ("auto", "no-share"):
        return requested
    can_share = source is not None and probe_reflink(source, probe_dir)
    if requested == "auto" and can_share:
        return "reflink"
    if probe_direct(probe_dir):
        return "direct"
    return "buffered" if can_share else "copy_file_range"


def probe_direct(dst_dir: Path) -> bool:
    """True if a new file in `dst_dir` takes an O_DIRECT write (not tmpfs before Linux 6.6, ...)."""
    probe = dst_dir / ".direct-probe"
    try:
        fd = _open_new(probe)
        try:
            with mmap.mmap(-1, ALIGN) as block:          # page-aligned, as O_DIRECT needs
                set_direct(fd, True)
                return os.pwrite(fd, block, 0) == ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        _unlink_quietly(probe)


def probe_reflink(src: Path, dst_dir: Path) -> bool:
    """True if a block of `src` can be cloned into a new file in `dst_dir` (same XFS/btrfs)."""
    if src.stat().st_size < ALIGN:
        return False
    probe = dst_dir / ".reflink-probe"
    try:
        with open(src, "rb") as s, open(probe, "wb") as d:
            clone_range(s.fileno(), d.fileno(), 0, 0, ALIGN)
        return True
    except OSError:
        return False
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Writing the output folder: atomic files, resume, lock
# ---------------------------------------------------------------------------------------------

def _partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def _open_new(path: Path, mode: int = 0o644) -> int:
    """Create `path` for writing; never follows a symlink planted in the output folder."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    # Read-write: the self-check reads back what was written.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, mode)                       # exactly `mode`, whatever the umask, like cp
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(root: Path, rel_dir: Path) -> None:
    """mkdir -p below `root`, refusing symlinks on the way."""
    path = root
    for part in rel_dir.parts:
        path = path / part
        try:
            os.mkdir(path)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise _fail(path, "exists in the output folder and is not a folder (or is a symlink); remove it")


def write_atomic(final: Path, fill: Callable[[int], None], mode: int = 0o644, sync_dir: bool = True) -> None:
    """Write a file under a temporary name, flush it, then rename it into place.

    A reader never sees a half-written file under the final name; a failure removes the partial.
    sync_dir=False leaves flushing the rename to the caller, who renames many files into one
    folder (a lost rename after a crash only means that file is written again).
    """
    tmp = _partial_path(final)
    fd = -1
    try:
        fd = _open_new(tmp, mode)             # inside the try: Ctrl-C may land right after the open
        fill(fd)
        os.fsync(fd)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        _unlink_quietly(tmp)
        if isinstance(e, OSError) and not e.filename:
            e.filename = str(final)
        raise
    os.close(fd)
    os.replace(tmp, final)
    if sync_dir:
        _fsync_dir(final.parent)


def _permissions(fd: int) -> int:
    return stat.S_IMODE(os.fstat(fd).st_mode)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    finally:
        view.release()            # a traceback keeping this frame must not pin an mmap


def new_scale_bytes(src_fd: int, piece: Piece, shard: str = "") -> bytes:
    """Read a scale from the source and resize it; refuses a scale that cannot be shrunk exactly."""
    raw = os.pread(src_fd, piece.src_end - piece.src_begin, piece.src_begin)
    if len(raw) != piece.src_end - piece.src_begin:
        raise ConversionError(f"{piece.name}: source ended early; was it changed during the run?")
    r = piece.resize
    new = resize_scale_bytes(raw, piece.dtype, r.old_shape, r.new_shape, r.old_block, r.new_block)
    if new is None:
        raise _fail(shard or piece.name, f"{piece.name}: this scale is not a {block_name(r.old_block)} replication "
                                         f"of {block_name(r.new_block)} scales (was the checkpoint really quantized "
                                         f"at {block_name(r.new_block)}?); going back would lose information")
    return new


def check_scales_shrink(shards: list[ShardPlan]) -> None:
    """Before writing anything that makes blocks larger: every scale must be a replication."""
    for shard in shards:
        if any(p.resize.new_block[0] > p.resize.old_block[0] or p.resize.new_block[1] > p.resize.old_block[1]
               for p in shard.scales):
            with open(shard.source, "rb") as f:
                for p in shard.scales:
                    new_scale_bytes(f.fileno(), p, shard.name)


def write_shard(shard: ShardPlan, output_dir: Path, copier: ByteCopier) -> None:
    """Stream one shard: header, resized scales, and every other byte copied from the source."""
    src_fd = os.open(shard.source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        def fill(fd: int) -> None:
            _pwrite_all(fd, shard.header, 0)
            copier.wrote(len(shard.header))
            # In output order, so the file only grows at its end: a clone must start at the
            # (block-aligned) end of the destination.
            steps: list[Piece | CopyRun] = [*shard.scales, *shard.copy_runs()]
            scales: dict[str, bytes] = {}
            for step in sorted(steps, key=lambda x: x.out_begin if isinstance(x, Piece) else x.dst):
                if isinstance(step, CopyRun):
                    copier.copy(src_fd, fd, step)
                else:
                    data = scales[step.name] = new_scale_bytes(src_fd, step, shard.name)
                    _pwrite_all(fd, data, step.out_begin)
                    copier.wrote(len(data))
            self_check(shard, fd, scales)
        write_atomic(output_dir / shard.name, fill, _permissions(src_fd), sync_dir=False)
    finally:
        os.close(src_fd)


def self_check(shard: ShardPlan, out_fd: int, scales: dict[str, bytes]) -> None:
    """Re-read what was just written: the size, the header and every resized scale (a few MB per
    shard), against the bytes meant to be there."""
    size = os.fstat(out_fd).st_size
    if size != shard.out_size:
        raise ConversionError(f"{shard.name}: wrote {size} bytes, planned {shard.out_size}; not renamed into place")
    if os.pread(out_fd, len(shard.header), 0) != shard.header:
        raise ConversionError(f"{shard.name}: header read back differs from the one written")
    for p in shard.scales:
        if os.pread(out_fd, p.out_end - p.out_begin, p.out_begin) != scales[p.name]:
            raise ConversionError(f"{shard.name}: {p.name}: scale read back differs from the one written")


def shard_is_complete(path: Path, shard: ShardPlan) -> bool:
    """A shard left by an earlier run counts only if its size and header are exactly the plan's."""
    return file_starts_with(path, shard.out_size, shard.header)


def file_starts_with(path: Path, size: int, prefix: bytes) -> bool:
    """True if `path` is a regular file (not a symlink) of `size` bytes beginning with `prefix`."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        with open(path, "rb") as f:
            return f.read(len(prefix)) == prefix
    except OSError:
        return False


def copy_other_file(item: OtherFile, output_dir: Path, copier: ByteCopier) -> None:
    final = output_dir / item.relpath
    _make_dirs(output_dir, Path(item.relpath).parent)
    src_fd = os.open(item.source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        write_atomic(final, lambda fd: copier.copy(src_fd, fd, CopyRun(0, 0, item.size)) if item.size else None,
                     _permissions(src_fd), sync_dir=False)
    finally:
        os.close(src_fd)


def write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    write_atomic(path, lambda fd: _pwrite_all(fd, data, 0))


def same_file_content(path: Path, data: bytes) -> bool:
    try:
        st = os.lstat(path)
        return stat.S_ISREG(st.st_mode) and st.st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


@dataclass
class OutputState:
    """What is already in OUTPUT, from an earlier run of the same conversion."""
    kind: str                       # "new", "resume" or "complete"
    done_shards: set[str] = field(default_factory=set)


def check_output_location(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output that is, contains, or lies inside the input, in any spelling."""
    src = Path(os.path.realpath(input_dir))
    dst = Path(os.path.realpath(output_dir))
    if src == dst or (output_dir.exists() and os.path.samefile(input_dir, output_dir)):
        raise _fail(output_dir, "is the input folder; the input is never modified, choose another -o")
    if src in dst.parents:
        raise _fail(output_dir, f"is inside the input folder {input_dir}; choose a folder outside it")
    if dst in src.parents:
        raise _fail(output_dir, f"contains the input folder {input_dir}; choose a new or empty folder")


def inspect_output(plan: Plan) -> OutputState:
    """Classify OUTPUT: new/empty, an unfinished run of this conversion, or already complete.

    Anything else that is not empty belongs to someone else and is refused untouched.
    """
    out = plan.output_dir
    if os.path.lexists(out) and not out.is_dir():
        raise _fail(out, "exists and is not a folder; choose another -o")
    if not out.exists() or not any(out.iterdir()):
        return OutputState("new")
    run_file = out / STATE_DIR / "run.json"
    if os.path.lexists(out / STATE_DIR):
        try:
            run = json.loads(run_file.read_text())
        except (OSError, ValueError):
            run = {"fingerprint": plan.fingerprint}   # killed before it was written: nothing to trust yet
        if not isinstance(run, dict) or run.get("fingerprint") != plan.fingerprint:
            raise _fail(out, f"holds an unfinished conversion of something else ({run.get('input', 'unknown')} "
                             f"to {run.get('target_block', '?')}); remove it or choose another -o")
        return OutputState("resume", _complete_shards(plan))
    done = _complete_shards(plan)
    if (len(done) == len(plan.shards) and same_file_content(out / CONFIG_NAME, plan.config_text.encode())
            and (plan.index_text is None or same_file_content(out / INDEX_NAME, plan.index_text.encode()))):
        return OutputState("complete", done)
    raise _fail(out, "exists and is not empty; choose a new or empty folder with -o (nothing was written)")


def _complete_shards(plan: Plan) -> set[str]:
    return {s.name for s in plan.shards if shard_is_complete(plan.output_dir / s.name, s)
            and shard_came_from_source(plan.output_dir / s.name, s)}


def shard_came_from_source(path: Path, shard: ShardPlan, sample: int = 65536) -> bool:
    """Cheap content check of a finished shard against its source: every scale, and the first and
    last bytes of every copied run. Another model with identical headers (DeepSeek-V3 and R1)
    fails it, so its shards are never taken for this conversion's."""
    with open(shard.source, "rb") as src, open(path, "rb") as out:
        for p in shard.scales:
            if os.pread(out.fileno(), p.out_end - p.out_begin, p.out_begin) != new_scale_bytes(src.fileno(), p):
                return False
        for r in shard.copy_runs():
            n = min(sample, r.length)
            for offset in (0, r.length - n):
                if os.pread(src.fileno(), n, r.src + offset) != os.pread(out.fileno(), n, r.dst + offset):
                    return False
    return True


class OutputLock:
    """An exclusive flock on OUTPUT/.resize_block_size/lock, held for the whole run."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / STATE_DIR / "lock"
        self.fd = -1

    def acquire(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = -1
            raise _fail(self.path.parent.parent, f"another resize-block-size run (pid {holder}) is writing "
                                                 "this folder; wait for it to finish or stop it")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------------------------
# Running a conversion
# ---------------------------------------------------------------------------------------------

@dataclass
class Summary:
    shards_written: int = 0
    shards_kept: int = 0
    scales: int = 0
    bytes_written: int = 0
    bytes_shared: int = 0
    seconds: float = 0.0
    method: str = ""


def bytes_to_write(plan: Plan, state: OutputState, reflink: bool) -> int:
    """Disk space the rest of the run needs: shared bytes cost nothing with copy-on-write."""
    need = 0
    for s in plan.shards:
        if s.name not in state.done_shards:
            need += s.out_size - (s.shareable_bytes() if reflink else 0)
    return need + sum(f.size for f in plan.other_files) + len(plan.config_text) + len(plan.index_text or "")


def human_bytes(n: float) -> str:
    """Bytes for people, in decimal units as disks and tqdm count them.

    >>> human_bytes(690e9), human_bytes(4032), human_bytes(12)
    ('690.0 GB', '4.0 kB', '12 B')
    """
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


class ProgressBar:
    """A byte counter on stderr (tqdm: bytes, GB/s, time left) that appears only once the work
    has taken `delay` seconds. tqdm is imported at that moment, not before: its import takes
    ~20 ms, a fifth of a whole copy-on-write conversion, which finishes long before a bar could
    be read. With quiet=True nothing is ever shown."""

    def __init__(self, total: int, desc: str, quiet: bool = False, delay: float = 0.5):
        self.total, self.desc, self.quiet = total, desc, quiet
        self.shown_after = time.monotonic() + delay
        self.count = 0
        self.bar = None

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and time.monotonic() >= self.shown_after:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.count, unit="B", unit_scale=True,
                            unit_divisor=1000, desc=self.desc, dynamic_ncols=True, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def convert(plan: Plan, *, force: bool = False, copy: str = "auto", workers: int = 1,
            quiet: bool = False) -> Summary:
    """Write `plan.output_dir`: shards, then other files, the index, and config.json last."""
    started = time.monotonic()
    state = inspect_output(plan)
    if state.kind == "complete" and not force:
        return Summary(shards_kept=len(plan.shards), method="already complete")
    created = not plan.output_dir.exists()
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    os.makedirs(plan.output_dir / STATE_DIR, exist_ok=True)
    lock = OutputLock(plan.output_dir)
    try:
        lock.acquire()
        state = inspect_output(plan)              # again, now that no other run can change it
        if force:
            state = OutputState(state.kind)
        method = choose_copy_method(copy, plan.shards[0].source if plan.shards else None,
                                    plan.output_dir / STATE_DIR)
        check_free_space(plan.output_dir, bytes_to_write(plan, state, method == "reflink"))
        check_scales_shrink([s for s in plan.shards if s.name not in state.done_shards])
        _write_run_file(plan)
        summary = _write_all(plan, state, method, workers, quiet)
        write_text(plan.output_dir / CONFIG_NAME, plan.config_text)
        lock.release()
        shutil.rmtree(plan.output_dir / STATE_DIR)
        _fsync_dir(plan.output_dir)
    except BaseException as e:
        held = lock.fd >= 0
        lock.release()
        if held and isinstance(e, ConversionError) and not _has_output(plan.output_dir):
            # Refused before writing anything (e.g. not enough space): leave no trace.
            shutil.rmtree(plan.output_dir if created else plan.output_dir / STATE_DIR, ignore_errors=True)
        raise
    summary.seconds = time.monotonic() - started
    return summary


def _has_output(output_dir: Path) -> bool:
    return any(p.name != STATE_DIR for p in output_dir.iterdir())


def _write_run_file(plan: Plan) -> None:
    run = {"tool": PROG, "version": __version__, "input": str(plan.input_dir.resolve()),
           "source_block": list(plan.source_block), "target_block": list(plan.target_block),
           "fingerprint": plan.fingerprint}
    write_text(plan.output_dir / STATE_DIR / "run.json", json.dumps(run, indent=2) + "\n")


def _write_all(plan: Plan, state: OutputState, method: str, workers: int, quiet: bool) -> Summary:
    todo = [s for s in plan.shards if s.name not in state.done_shards]
    copier = write_files(plan.output_dir, todo, plan.other_files, method=method, workers=workers, quiet=quiet)
    if plan.index_text is not None:
        write_text(plan.output_dir / INDEX_NAME, plan.index_text)
    return Summary(shards_written=len(todo), shards_kept=len(plan.shards) - len(todo),
                   scales=sum(len(s.scales) for s in todo),
                   bytes_written=copier.total,
                   bytes_shared=copier.shared, method=copier.method)


def write_files(out: Path, shards: list[ShardPlan], others: list[OtherFile] = (), *, method: str,
                workers: int = 1, quiet: bool = False) -> ByteCopier:
    """Write shards and copy other files into `out`, with one progress bar over all their bytes."""
    for stale in out.glob(".*.partial"):      # left by a killed run; ours by name
        _unlink_quietly(stale)
    total = sum(s.out_size for s in shards) + sum(f.size for f in others)
    bar = ProgressBar(total, "converting", quiet)
    bar_lock = threading.Lock()

    def advance(n: int) -> None:
        with bar_lock:
            bar.update(n)

    stop = threading.Event()
    copier = ByteCopier(method, advance, stop)
    jobs: list[Callable[[], None]] = [(lambda s=s: write_shard(s, out, copier)) for s in shards]
    jobs += [(lambda f=f: copy_other_file(f, out, copier)) for f in others]
    try:
        run_jobs(jobs, workers, stop)
    finally:
        bar.close()
    for folder in {out, *(out / Path(f.relpath).parent for f in others)}:
        _fsync_dir(folder)                    # every rename above, flushed once per folder
    return copier


def check_free_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise _fail(folder, f"needs {human_bytes(need)} more but its filesystem has "
                            f"{human_bytes(free)} free; free space or choose another -o")


def run_jobs(jobs: list[Callable[[], None]], workers: int, stop: threading.Event) -> None:
    """Run jobs in order, or on `workers` threads; on Ctrl-C or an error, stop the others promptly."""
    if workers <= 1:
        for job in jobs:
            job()
        return
    # Imported here: it pulls in logging, 3 ms that a one-worker copy-on-write run need not pay.
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(job) for job in jobs]
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            for f in done:
                f.result()
    except BaseException:
        stop.set()
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# In place: convert INPUT itself, one shard at a time, and restore it exactly
# ---------------------------------------------------------------------------------------------
# INPUT/.resize_block_size/ keeps, before any shard is replaced, everything needed to give back the
# original files byte for byte: run.json (blocks, shard sizes), original/config.json, the original
# index, and each shard's original header bytes (original/headers/NAME). The tensor bytes never
# change and the original scales are every (2, 2)-th element of the new ones, so that is enough.
# Progress needs no record: each shard is either the original (its recorded size and header) or
# the converted one (the planned size and header); anything else is refused.

def _state_path(folder: Path) -> Path:
    return folder / STATE_DIR


def save_in_place_state(ckpt: Checkpoint, target: tuple[int, int]) -> None:
    """Record the original headers, config and index, flushed, before anything is replaced."""
    state = _state_path(ckpt.folder)
    _make_dirs(state, Path("original/headers"))
    for h in ckpt.headers:
        write_atomic(state / "original/headers" / h.name, lambda fd, h=h: _pwrite_all(fd, h.prefix, 0),
                     sync_dir=False)
    _fsync_dir(state / "original/headers")
    write_text(state / "original" / CONFIG_NAME, ckpt.config_text)
    if ckpt.index_text is not None:
        write_text(state / "original" / INDEX_NAME, ckpt.index_text)
    run = {"tool": PROG, "version": __version__, "mode": "in-place",
           "source_block": list(ckpt.source_block), "target_block": list(target),
           "shards": {h.name: h.size for h in ckpt.headers}}
    write_text(state / "run.json", json.dumps(run, indent=2) + "\n")     # last: marks the state complete


def load_in_place_state(folder: Path) -> tuple[Checkpoint, tuple[int, int]] | None:
    """The original checkpoint as recorded before an in-place conversion, and its target block;
    None if there is no complete record."""
    state = _state_path(folder)
    try:
        run = json.loads((state / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or run.get("mode") != "in-place":
        raise _fail(state, "is not an in-place conversion record of this tool; remove it or move it away")
    config_text = (state / "original" / CONFIG_NAME).read_text(encoding="utf-8")
    config = json.loads(config_text)
    source = read_source_block(config, state / "original" / CONFIG_NAME)
    headers = [parse_shard_header(folder / name, name, size, (state / "original/headers" / name).read_bytes())
               for name, size in sorted(run["shards"].items())]
    index_path = state / "original" / INDEX_NAME
    index_text = index_path.read_text(encoding="utf-8") if index_path.exists() else None
    pairs, fp8 = pair_scales(headers, source)
    ckpt = Checkpoint(folder, config_text, config, source, headers, index_text,
                      json.loads(index_text) if index_text else None, pairs, fp8, [])
    return ckpt, tuple(run["target_block"])


def in_place_extra_bytes(shards: list[ShardPlan], reflink: bool = False) -> int:
    """Peak extra disk of an in-place run: the largest new shard (less what copy-on-write shares)."""
    return max((s.out_size - (s.shareable_bytes() if reflink else 0) for s in shards), default=0)


def convert_in_place(ckpt: Checkpoint, target: tuple[int, int], *, recorded: bool, copy: str = "auto",
                     quiet: bool = False) -> Summary:
    """Convert `ckpt.folder` itself to `target` blocks, one shard at a time. `recorded`: the
    checkpoint comes from the state of an earlier, interrupted or finished, in-place run."""
    started = time.monotonic()
    plan = make_plan(ckpt, ckpt.folder, target)
    check_scales_shrink(plan.shards)              # going back (e.g. 64 -> 128): refuse before recording
    with _locked_state(ckpt.folder):
        if not recorded:
            save_in_place_state(ckpt, target)
        summary = _convert_shards_in_place(ckpt, plan, copy, quiet)
    summary.seconds = time.monotonic() - started
    return summary


def restore_in_place(folder: Path, *, copy: str = "auto", quiet: bool = False) -> Summary:
    """Give back the original files of a folder converted in place, byte for byte, and remove the
    state folder."""
    started = time.monotonic()
    recorded = load_in_place_state(folder) if folder.is_dir() else None
    trash = folder / (STATE_DIR + ".removing")
    if recorded is None:
        # Killed while recording (nothing was replaced before run.json) or while removing the
        # record (everything was restored): either way the shards are the original ones.
        leftovers = [p for p in (_state_path(folder), trash) if p.is_dir()]
        if not leftovers:
            raise _fail(folder, "has no record of an in-place conversion (none was made here, or a --restore "
                                "finished and removed it); to go back to the original blocks from a separate "
                                "output, convert it with --block-size 128 (the original block)")
        for p in leftovers:
            shutil.rmtree(p)
        return Summary(method="restored")
    ckpt, target = recorded
    with _locked_state(folder):
        summary = _restore_shards(ckpt, make_plan(ckpt, folder, target), copy, quiet)
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(_state_path(folder), trash)    # atomic: the record is gone as a whole or not at all
    shutil.rmtree(trash)
    _fsync_dir(folder)
    summary.seconds = time.monotonic() - started
    return summary


class _locked_state:
    """Hold the lock of the state folder inside `folder` (created if needed)."""

    def __init__(self, folder: Path):
        _state_path(folder).mkdir(exist_ok=True)
        self.lock = OutputLock(folder)

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _convert_shards_in_place(ckpt: Checkpoint, plan: Plan, copy: str, quiet: bool) -> Summary:
    todo = []
    for shard, original in zip(plan.shards, ckpt.headers):
        path = ckpt.folder / shard.name
        if shard_is_complete(path, shard):
            continue
        if not file_starts_with(path, original.size, original.prefix):
            raise _fail(shard.name, "is neither the original shard nor its converted version; restore it from "
                                    "the download before converting in place")
        todo.append(shard)
    return _replace_shards(ckpt.folder, todo, len(plan.shards), plan.index_text, plan.config_text,
                           copy, quiet, "in-place")


def _restore_shards(ckpt: Checkpoint, forward: Plan, copy: str, quiet: bool) -> Summary:
    todo = []
    for shard, original in zip(forward.shards, ckpt.headers):
        path = ckpt.folder / shard.name
        if file_starts_with(path, original.size, original.prefix):
            continue
        if not shard_is_complete(path, shard):
            raise _fail(shard.name, "is neither the converted shard nor the original; it was changed after the "
                                    "in-place conversion, cannot restore it exactly")
        todo.append(invert_shard(shard, original))
    check_scales_shrink(todo)
    return _replace_shards(ckpt.folder, todo, len(forward.shards), ckpt.index_text, ckpt.config_text,
                           copy, quiet, "restored")


def _replace_shards(folder: Path, todo: list[ShardPlan], total: int, index_text: str | None,
                    config_text: str, copy: str, quiet: bool, what: str) -> Summary:
    """Replace shards one at a time (each written beside the old one, then renamed over it), then
    the index, then config.json."""
    method = choose_copy_method(copy, todo[0].source if todo else None, _state_path(folder))
    check_free_space(folder, in_place_extra_bytes(todo, method == "reflink"))
    copier = write_files(folder, todo, method=method, quiet=quiet)
    if index_text is not None:
        write_text(folder / INDEX_NAME, index_text)
    write_text(folder / CONFIG_NAME, config_text)
    return Summary(shards_written=len(todo), shards_kept=total - len(todo),
                   scales=sum(len(s.scales) for s in todo),
                   bytes_written=copier.total,
                   bytes_shared=copier.shared, method=what)


# ---------------------------------------------------------------------------------------------
# Verifying an output against its input
# ---------------------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    tensors_equal: int = 0
    scales_replicated: int = 0
    files_equal: int = 0
    bytes_compared: int = 0
    problems: list[str] = field(default_factory=list)


def first_difference(fd_a: int, off_a: int, fd_b: int, off_b: int, length: int,
                     on_bytes: Callable[[int], None] = lambda n: None) -> int | None:
    """Offset of the first differing byte of two equal-length ranges, or None; streams 8 MB at a time."""
    done = 0
    while done < length:
        n = min(BUFFER_BYTES, length - done)
        a, b = os.pread(fd_a, n, off_a + done), os.pread(fd_b, n, off_b + done)
        if a != b:
            if len(a) != len(b):
                return done + min(len(a), len(b))
            return done + next(i for i in range(len(a)) if a[i] != b[i])
        done += n
        on_bytes(n)
    return None


def verify_output(plan: Plan, quiet: bool = False) -> VerifyReport:
    """Check every output tensor and file against the input, without trusting the output's header
    layout: unchanged tensors byte-equal, scales equal to the replication of the source scale in the
    engine shape, config and index as planned, every other file byte-equal."""
    report = VerifyReport()
    out = plan.output_dir
    total = (sum(p.src_end - p.src_begin for s in plan.shards for p in s.pieces)
             + sum(f.size for f in plan.other_files))
    with ProgressBar(total, "verifying", quiet) as bar:
        for shard in plan.shards:
            _verify_shard(plan, shard, report, bar.update)
        for item in plan.other_files:
            _verify_other_file(out, item, report, bar.update)
    _verify_json(out / CONFIG_NAME, plan.config_text, report,
                 "differs from the input's config.json with only weight_block_size changed")
    if plan.index_text is not None:
        _verify_json(out / INDEX_NAME, plan.index_text, report,
                     "weight_map or total_size differ from the input's index and the real tensor sizes")
    if os.path.lexists(out / STATE_DIR):
        report.problems.append(f"{out}: an unfinished run's {STATE_DIR}/ is still there; re-run the conversion")
    return report


def _verify_shard(plan: Plan, shard: ShardPlan, report: VerifyReport, on_bytes: Callable[[int], None]) -> None:
    path = plan.output_dir / shard.name
    if not path.is_file():
        report.problems.append(f"{shard.name}: missing from the output")
        return
    try:
        header = read_shard_header(path, shard.name)
    except ConversionError as e:
        report.problems.append(str(e))
        return
    metadata = dict(read_shard_header(shard.source, shard.name).metadata or {})
    metadata.setdefault("format", "pt")
    if header.metadata != metadata:
        report.problems.append(f"{shard.name}: __metadata__ {header.metadata} differs from the input's {metadata}")
    written = {t.name: t for t in header.tensors}
    if set(written) != {p.name for p in shard.pieces}:
        missing = sorted({p.name for p in shard.pieces} - set(written)) or sorted(set(written) - {p.name for p in shard.pieces})
        report.problems.append(f"{shard.name}: {missing[0]}: tensor names differ from the input shard")
        return
    with open(shard.source, "rb") as src, open(path, "rb") as dst:
        for p in shard.pieces:
            t = written[p.name]
            if (t.dtype, t.shape) != (p.dtype, p.shape):
                report.problems.append(f"{shard.name}: {p.name}: {t.dtype} {list(t.shape)}, expected {p.dtype} {list(p.shape)}")
            elif p.resize:
                expected = new_scale_bytes(src.fileno(), p, shard.name)
                if os.pread(dst.fileno(), len(expected), t.begin) != expected:
                    report.problems.append(f"{shard.name}: {p.name}: scale values are not the input scale "
                                           f"resized from {block_name(plan.source_block)} to "
                                           f"{block_name(plan.target_block)} blocks")
                else:
                    report.scales_replicated += 1
                on_bytes(p.src_end - p.src_begin)
            else:
                at = first_difference(src.fileno(), p.src_begin, dst.fileno(), t.begin, t.end - t.begin, on_bytes)
                if at is not None:
                    report.problems.append(f"{shard.name}: {p.name}: byte {at} differs from the input")
                else:
                    report.tensors_equal += 1
            report.bytes_compared += p.src_end - p.src_begin


def _verify_other_file(out: Path, item: OtherFile, report: VerifyReport, on_bytes: Callable[[int], None]) -> None:
    path = out / item.relpath
    if not path.is_file() or path.stat().st_size != item.size:
        report.problems.append(f"{item.relpath}: missing from the output or of another size")
        return
    with open(item.source, "rb") as a, open(path, "rb") as b:
        at = first_difference(a.fileno(), 0, b.fileno(), 0, item.size, on_bytes)
    if at is not None:
        report.problems.append(f"{item.relpath}: byte {at} differs from the input")
    else:
        report.files_equal += 1
        report.bytes_compared += item.size


def _verify_json(path: Path, expected_text: str, report: VerifyReport, what: str) -> None:
    try:
        if json.loads(path.read_text(encoding="utf-8")) == json.loads(expected_text):
            report.files_equal += 1
            return
    except (OSError, ValueError):
        report.problems.append(f"{path.name}: missing or not valid JSON")
        return
    report.problems.append(f"{path.name}: {what}")


# ---------------------------------------------------------------------------------------------
# Engine check: load the checkpoint with the serving engine's own layers, rank by rank, on the CPU
# ---------------------------------------------------------------------------------------------
# The TP advisor above restates the engines' split rules; a restatement can drift from the engine.
# This section asks the engine: it builds SGLang's own layer classes the way its model file does,
# poses as each TP rank (with no process group SGLang's linear.py partitions by a logical group of
# that rank and size), and hands each parameter's own weight_loader the checkpoint's tensors. Nothing
# here splits a tensor; the only checkpoint-name -> parameter mapping is the model file's own, cited
# where it is used. torch and sglang are imported here only: no other mode pays for them.

ENGINES = ("sglang",)
# Architectures whose SGLang model code this section drives (config.json "architectures"). Kimi-K2
# and DeepSeek-R1/V3.1 use DeepseekV3ForCausalLM.
ENGINE_ARCHITECTURES = {"sglang": ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM",
                                   "Qwen3ForCausalLM")}
_QWEN3 = ("Qwen3MoeForCausalLM", "Qwen3ForCausalLM")
ENGINE_INSTALL = {"sglang": "run it where SGLang serves the model, or install it (README, 'Engine check': "
                            "pip install --no-deps sglang==0.5.23 plus the packages listed there)"}
_TORCH_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
                 "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass
class LayerKind:
    """One SGLang module to build for every rank, and the checkpoint FP8 weights it loads."""
    kind: str                       # e.g. "dense MLP", "MTP routed experts"
    prefix: str                     # checkpoint prefix of the representative, e.g. model.layers.0.mlp
    module: str                     # which SGLang module: mlp, experts, fused_qkv_a, q_b_proj, ...
    weights: tuple[str, ...]        # the representative's FP8 weight names


@dataclass
class KindResult:
    kind: str
    prefix: str
    ranks: int
    loaded: int = 0
    error: str | None = None        # the engine's own text, with the tensor and the first failing rank
    failed_ranks: int = 0
    compared_ranks: list[int] = field(default_factory=list)
    mismatch: str | None = None     # a rank whose weights do not dequantize to the input's slice
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.mismatch is None and self.loaded == self.ranks


@dataclass
class EngineReport:
    engine: str
    version: str
    folder: str
    what: str                       # "output", "input as it is", "planned 64x64 output"
    block: tuple[int, int]
    tp: int
    ep: bool
    architecture: str
    unsupported: str | None = None
    kinds: list[KindResult] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.unsupported is None and bool(self.kinds) and not self.unchecked and all(k.ok for k in self.kinds)


def import_engine(engine: str) -> str:
    """Import the engine's layers (lazily: only --engine pays this) and return its version; one
    line naming the missing module and how to install when it is not importable."""
    import importlib.metadata
    import logging
    import warnings
    logging.getLogger("sglang").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sglang.srt.layers.linear  # noqa: F401
            import sglang.srt.layers.moe.fused_moe_triton.layer  # noqa: F401
            import sglang.srt.layers.quantization.fp8  # noqa: F401
            import sglang.srt.models.deepseek_v2  # noqa: F401
            from sglang.srt.runtime_context import get_parallel
        get_parallel()
        return importlib.metadata.version("sglang")
    except Exception as e:        # any failure of the engine's import path means: cannot check
        raise ConversionError(f"--engine {engine}: SGLang is not importable here ({type(e).__name__}: {e}); "
                              f"{ENGINE_INSTALL[engine]}")


def engine_layer_kinds(ckpt: Checkpoint) -> tuple[list[LayerKind], list[str]]:
    """One representative per kind of FP8 layer (by name pattern and shapes), for the DeepSeek-V2/V3
    model file; and the FP8 weights no kind covers (reported as not checked, never as passed)."""
    layers = ckpt.config.get("num_hidden_layers")
    weights = {p.weight.name[: -len(".weight")]: p.weight.shape for p in ckpt.pairs.values()
               if p.weight.name.endswith(".weight")}
    qwen3 = bool(set(ckpt.config.get("architectures") or ()) & set(_QWEN3))
    patterns = ((   # Qwen3 / Qwen3-MoE (models/qwen3.py, qwen3_moe.py): q/k/v fused, the rest as DeepSeek's
        ("qkv", "qkv_proj (q_proj + k_proj + v_proj)", r"(model\.layers\.(\d+)\.self_attn)\.q_proj",
         ("q_proj", "k_proj", "v_proj")),
        ("o_proj", "o_proj", r"(model\.layers\.(\d+)\.self_attn)\.o_proj", ("o_proj",)),
        ("mlp", "dense MLP", r"(model\.layers\.(\d+)\.mlp)\.gate_proj", ("gate_proj", "up_proj", "down_proj")),
        ("experts", "routed experts", r"(model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.gate_proj",
         ("{e}.gate_proj", "{e}.up_proj", "{e}.down_proj")),
    ) if qwen3 else (   # DeepSeek-V2/V3 (models/deepseek_v2.py)
        ("mlp", "dense MLP", r"(model\.layers\.(\d+)\.mlp)\.gate_proj", ("gate_proj", "up_proj", "down_proj")),
        ("shared", "shared experts", r"(model\.layers\.(\d+)\.mlp\.shared_experts)\.gate_proj",
         ("gate_proj", "up_proj", "down_proj")),
        ("experts", "routed experts", r"(model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.gate_proj",
         ("{e}.gate_proj", "{e}.up_proj", "{e}.down_proj")),
        ("fused_qkv_a", "fused q_a_proj + kv_a_proj_with_mqa", r"(model\.layers\.(\d+)\.self_attn)\.q_a_proj",
         ("q_a_proj", "kv_a_proj_with_mqa")),
        ("kv_a", "kv_a_proj_with_mqa", r"(model\.layers\.(\d+)\.self_attn)\.kv_a_proj_with_mqa",
         ("kv_a_proj_with_mqa",)),
        ("q_proj", "q_proj", r"(model\.layers\.(\d+)\.self_attn)\.q_proj", ("q_proj",)),
        ("q_b_proj", "q_b_proj", r"(model\.layers\.(\d+)\.self_attn)\.q_b_proj", ("q_b_proj",)),
        ("kv_b_proj", "kv_b_proj", r"(model\.layers\.(\d+)\.self_attn)\.kv_b_proj", ("kv_b_proj",)),
        ("o_proj", "o_proj", r"(model\.layers\.(\d+)\.self_attn)\.o_proj", ("o_proj",)),
    ))
    kinds: dict[tuple, LayerKind] = {}
    covered: set[str] = set()
    for name in sorted(weights, key=_natural_key):
        for module, kind, regex, members in patterns:
            m = re.fullmatch(regex, name)
            if not m or (module == "kv_a" and name.replace("kv_a_proj_with_mqa", "q_a_proj") in weights):
                continue
            expert = m.group(3) if module == "experts" else ""
            names = tuple(f"{m.group(1)}.{w.format(e=expert)}" for w in members)
            if not all(n in weights for n in names):
                continue
            covered.update(names)
            mtp = isinstance(layers, int) and int(m.group(2)) >= layers
            key = (module, mtp, tuple(weights[n] for n in names))
            if key not in kinds:
                label = f"MTP {kind}" if mtp else kind
                kinds[key] = LayerKind(label, m.group(1) + (f".{expert}" if expert else ""), module, names)
    unchecked = sorted(n + ".weight" for n in weights if n not in covered)
    return list(kinds.values()), unchecked


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class _TensorReader:
    """Reads a checkpoint's tensors (as torch tensors) by name; with `resize`, serves each scale as
    the conversion to that block would write it (same function as the writer), so --dry-run can
    check the planned output without writing it."""

    def __init__(self, ckpt: Checkpoint, resize: tuple[int, int] | None = None):
        self.ckpt, self.resize = ckpt, resize
        self.where = {t.name: (h.path, t) for h in ckpt.headers for t in h.tensors}

    def get(self, name: str):
        import torch
        path, t = self.where[name]
        with open(path, "rb") as f:
            raw = os.pread(f.fileno(), t.end - t.begin, t.begin)
        shape = t.shape
        if self.resize and name in self.ckpt.pairs and self.resize != self.ckpt.source_block:
            weight = self.ckpt.pairs[name].weight
            shape = scale_shape(weight.shape, self.resize)
            raw = resize_scale_bytes(raw, t.dtype, t.shape, shape, self.ckpt.source_block, self.resize)
        return torch.frombuffer(bytearray(raw), dtype=getattr(torch, _TORCH_DTYPES[t.dtype])).reshape(shape)

def _dequantize(q, scale, block: tuple[int, int]):
    """Block dequantization, float32: each element times its block's scale (edge blocks partial)."""
    n, k = q.shape[-2:]
    full = scale.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return q.float() * full[..., :n, :k]


def _need(config: dict, key: str) -> int:
    """A config.json number the layer needs; a missing one is the checkpoint's problem, not the engine's."""
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(CONFIG_NAME, f"{key} is {value!r}; the engine check needs it to build the layers")
    return value


def _sglang_module(kind: LayerKind, config: dict, quant_config, tp: int, ep: bool):
    """Build the SGLang module for `kind` as models/deepseek_v2.py does (SGLang 0.5.23), for the rank
    the caller's parallel override poses as. `quant_config` None builds the unquantized twin."""
    from sglang.srt.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.models.deepseek_v2 import DeepseekV2MLP
    c = config
    if set(c.get("architectures") or ()) & set(_QWEN3):
        return _sglang_qwen3_module(kind, c, quant_config, tp, ep)
    hidden, act, q = _need(c, "hidden_size"), c.get("hidden_act", "silu"), quant_config
    if kind.module == "mlp":            # DeepseekV2DecoderLayer.__init__, dense layers
        return DeepseekV2MLP(hidden, _need(c, "intermediate_size"), act, quant_config=q, prefix=kind.prefix,
                             reduce_results=False, allow_fused_down=False, parallel_group="tp")
    if kind.module == "shared":         # DeepseekV2MoE.__init__, shared experts (TP, no DeepEP)
        inter = _need(c, "moe_intermediate_size") * _need(c, "n_shared_experts")
        return DeepseekV2MLP(hidden, inter, act, quant_config=q, reduce_results=False, prefix=kind.prefix,
                             parallel_group="tp")
    if kind.module == "experts":        # DeepseekV2MoE.__init__: get_moe_impl_class(...) is FusedMoE here.
        # One expert per rank under EP, one expert (split) under TP: the representative stands for all.
        return FusedMoE(num_experts=tp if ep else 1, hidden_size=hidden, layer_id=0, top_k=1, quant_config=q,
                        intermediate_size=_need(c, "moe_intermediate_size"), prefix=kind.prefix)
    heads, rope, kv_lora = _need(c, "num_attention_heads"), _need(c, "qk_rope_head_dim"), _need(c, "kv_lora_rank")
    nope = _need(c, "qk_nope_head_dim")
    if kind.module == "fused_qkv_a":    # DeepseekV2AttentionMLA.__init__, q_lora_rank set
        return ReplicatedLinear(hidden, _need(c, "q_lora_rank") + kv_lora + rope, bias=False, quant_config=q,
                                prefix=kind.prefix + ".fused_qkv_a_proj_with_mqa")
    if kind.module == "kv_a":           # q_lora_rank None
        return ReplicatedLinear(hidden, kv_lora + rope, bias=False, quant_config=q,
                                prefix=kind.prefix + ".kv_a_proj_with_mqa")
    if kind.module in ("q_proj", "q_b_proj"):
        return ColumnParallelLinear(hidden if kind.module == "q_proj" else _need(c, "q_lora_rank"),
                                    heads * (nope + rope), bias=False, quant_config=q,
                                    prefix=f"{kind.prefix}.{kind.module}", parallel_group="attn_tp")
    if kind.module == "kv_b_proj":
        return ColumnParallelLinear(kv_lora, heads * (nope + _need(c, "v_head_dim")), bias=False, quant_config=q,
                                    prefix=kind.prefix + ".kv_b_proj", parallel_group="attn_tp")
    if kind.module == "o_proj":
        return RowParallelLinear(heads * _need(c, "v_head_dim"), hidden, bias=False, quant_config=q,
                                 reduce_results=False, prefix=kind.prefix + ".o_proj", parallel_group="attn_tp")
    raise AssertionError(kind.module)


def _sglang_qwen3_module(kind: LayerKind, c: dict, quant_config, tp: int, ep: bool):
    """The SGLang module for `kind` as models/qwen3_moe.py (Qwen3MoeAttention, Qwen3MoeSparseMoeBlock,
    Qwen3MoeMLP = Qwen2MoeMLP) and models/qwen3.py (Qwen3MLP = Qwen2MLP) build it."""
    from sglang.srt.layers.linear import QKVParallelLinear, RowParallelLinear
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.models.qwen2 import Qwen2MLP
    from sglang.srt.models.qwen2_moe import Qwen2MoeMLP
    hidden, heads = _need(c, "hidden_size"), _need(c, "num_attention_heads")
    head_dim = c.get("head_dim") or hidden // heads
    bias = bool(c.get("attention_bias", False))
    if kind.module == "qkv":
        return QKVParallelLinear(hidden, head_dim, heads, c.get("num_key_value_heads") or heads, bias=bias,
                                 quant_config=quant_config, parallel_group="attn_tp", prefix=kind.prefix + ".qkv_proj")
    if kind.module == "o_proj":
        return RowParallelLinear(heads * head_dim, hidden, bias=bias, quant_config=quant_config,
                                 parallel_group="attn_tp", reduce_results=False, prefix=kind.prefix + ".o_proj")
    if kind.module == "mlp":
        mlp = Qwen2MoeMLP if "Qwen3MoeForCausalLM" in (c.get("architectures") or ()) else Qwen2MLP
        return mlp(hidden, _need(c, "intermediate_size"), c.get("hidden_act", "silu"), quant_config=quant_config,
                   reduce_results=False, prefix=kind.prefix)
    if kind.module == "experts":
        return FusedMoE(num_experts=tp if ep else 1, top_k=1, layer_id=0, hidden_size=hidden, prefix=kind.prefix,
                        intermediate_size=_need(c, "moe_intermediate_size"), quant_config=quant_config)
    raise AssertionError(kind.module)


def _sglang_load(module, kind: LayerKind, tensor, rank: int, ep: bool) -> None:
    """Feed the module's own weight_loaders as DeepseekV2WeightLoaderMixin.do_load_weights
    (models/deepseek_common/deepseek_weight_loader.py) does: gate_proj -> gate_up_proj shard 0 and
    up_proj -> shard 1 (its stacked_params_mapping); experts through FusedMoE's loader with shard
    w1/w3/w2 (FusedMoE.make_expert_params_mapping); q_a_proj and kv_a_proj_with_mqa joined along
    dim 0 into fused_qkv_a_proj_with_mqa (its cached_a_proj); everything else as it is.
    `tensor(name)` returns the checkpoint tensor (weight or scale) of that name."""
    params = dict(module.named_parameters())
    for suffix in ("weight", "weight_scale_inv"):
        if suffix not in params and f"w13_{suffix}" not in params and f"gate_up_proj.{suffix}" not in params:
            continue                   # the unquantized twin has no scales
        if kind.module in ("mlp", "shared"):
            gate, up, down = kind.weights
            p = params[f"gate_up_proj.{suffix}"]
            p.weight_loader(p, tensor(f"{gate}.{suffix}"), 0)
            p.weight_loader(p, tensor(f"{up}.{suffix}"), 1)
            p = params[f"down_proj.{suffix}"]
            p.weight_loader(p, tensor(f"{down}.{suffix}"))
        elif kind.module == "experts":
            expert = rank if ep else 0
            for name, shard, param in zip(kind.weights, ("w1", "w3", "w2"), ("w13", "w13", "w2")):
                p = params[f"{param}_{suffix}"]
                p.weight_loader(p, tensor(f"{name}.{suffix}"), f"{kind.prefix}.{param}_{suffix}",
                                shard_id=shard, expert_id=expert)
        elif kind.module == "qkv":      # Qwen3's load_weights: q_proj/k_proj/v_proj -> qkv_proj "q"/"k"/"v"
            p = params[suffix]
            for name, shard in zip(kind.weights, ("q", "k", "v")):
                p.weight_loader(p, tensor(f"{name}.{suffix}"), shard)
        elif kind.module == "fused_qkv_a":
            import torch
            q_a, kv_a = kind.weights
            p = params[suffix]
            p.weight_loader(p, torch.cat([tensor(f"{q_a}.{suffix}"), tensor(f"{kv_a}.{suffix}")], dim=0))
        else:
            p = params[suffix]
            p.weight_loader(p, tensor(f"{kind.weights[0]}.{suffix}"))


def _pose_as(tp: int, rank: int, ep: bool) -> dict:
    """The SGLang parallel values of TP rank `rank` of `tp` (attention TP = TP, no DP attention);
    with EP the experts are placed one group per rank instead of split."""
    return dict(tp_size=tp, tp_rank=rank, tp_group=None, attn_tp_size=tp, attn_tp_rank=rank, attn_tp_group=None,
                moe_ep_size=tp if ep else 1, moe_ep_rank=rank if ep else 0,
                moe_tp_size=1 if ep else tp, moe_tp_rank=0 if ep else rank)


def _coordinate(ref: _TensorReader, kind: LayerKind, name: str, what: str):
    """A tensor the shape of checkpoint weight `name` whose every element says where it is: which of
    the kind's weights ("source"), its row or its column. Expanded views: no memory until a loader
    copies the rank's part out of them."""
    import torch
    n, k = ref.where[name][1].shape
    if what == "source":
        return torch.tensor(float(kind.weights.index(name[: -len(".weight")]))).expand(n, k)
    if what == "row":
        return torch.arange(n, dtype=torch.float32)[:, None].expand(n, k)
    return torch.arange(k, dtype=torch.float32)[None, :].expand(n, k)


def _compare_rank(module, kind: LayerKind, config: dict, tp: int, ep: bool, rank: int, block: tuple[int, int],
                  ref: _TensorReader, ref_tensor: Callable) -> str | None:
    """None if every FP8 parameter the rank holds, dequantized with its scale, equals the reference
    checkpoint's weight x scale at the same elements, bit for bit. Which elements a rank holds is
    not computed here: unquantized twins of the module, loaded by the same SGLang loaders with
    tensors of element coordinates (float32: exact below 2^24), say where each element came from."""
    import torch
    coords = {}
    for what in ("source", "row", "col"):
        twin = _sglang_module(kind, config, None, tp, ep)
        _sglang_load(twin, kind, lambda n, what=what: _coordinate(ref, kind, n, what), rank, ep)
        coords[what] = {name: p.data for name, p in twin.named_parameters()}
    ref_block = ref.ckpt.source_block
    # As bytes: index_select is not implemented for float8 on every torch.
    qs = [ref_tensor(w + ".weight").view(torch.uint8) for w in kind.weights]
    scales = [ref_tensor(w + ".weight_scale_inv").float() for w in kind.weights]
    params = dict(module.named_parameters())
    for name, p in params.items():
        if p.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            continue
        got = _dequantize(p.data, params[name + "_scale_inv"].data, block)
        source, rows, cols = (coords[what][name] for what in ("source", "row", "col"))
        # Loaders copy whole rows and columns (narrow, cat): an element's source and row follow from
        # its row, its column from its column. Checked here, then rows and columns are gathered at once.
        if not (torch.equal(source, source[..., :1].expand_as(source))
                and torch.equal(rows, rows[..., :1].expand_as(rows))
                and torch.equal(cols, cols[..., :1, :].expand_as(cols))):
            return f"{name}: the loader placed elements other than whole rows and columns; cannot compare"
        want = torch.empty(got.shape)
        for m in range(math.prod(got.shape[:-2])):      # each expert of a fused MoE parameter
            out, src_rows = want.view(-1, *got.shape[-2:])[m], source.reshape(-1, *got.shape[-2:])[m, :, 0].long()
            r = rows.reshape(-1, *got.shape[-2:])[m, :, 0].long()
            c = cols.reshape(-1, *got.shape[-2:])[m, 0, :].long()
            for i in src_rows.unique().tolist():
                sel = (src_rows == i).nonzero().squeeze(1)
                q = qs[i].index_select(0, r[sel]).index_select(1, c).view(p.dtype).float()
                out[sel] = q * scales[i].index_select(0, r[sel] // ref_block[0]).index_select(1, c // ref_block[1])
        if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
            return f"{name}: the rank's weight x scale differs from the input's at the same elements"
    return None


def engine_check(ckpt: Checkpoint, tp: int, ep: bool, engine: str, *, what: str = "output",
                 reference: Checkpoint | None = None, planned: tuple[int, int] | None = None) -> EngineReport:
    """Load `ckpt` (or, with `planned`, the conversion of it to that block) with the engine's own
    layers and loaders on every rank of TP `tp`, and compare what a few ranks hold, dequantized,
    with the dequantized `reference` (default: the checkpoint itself) sliced by the same loaders."""
    import torch
    version = import_engine(engine)
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.runtime_context import create_context, get_parallel, use_context
    from sglang.srt.server_args import ServerArgs
    block = planned or ckpt.source_block
    arch = ", ".join(ckpt.config.get("architectures") or ["(none in config.json)"])
    report = EngineReport(engine, version, str(ckpt.folder), what, block, tp, ep, arch)
    if not set(ckpt.config.get("architectures") or ()) & set(ENGINE_ARCHITECTURES[engine]):
        report.unsupported = (f"architecture {arch} is not one this check can build with {engine} "
                              f"(supported: {', '.join(ENGINE_ARCHITECTURES[engine])}); nothing was checked")
        return report
    kinds, report.unchecked = engine_layer_kinds(ckpt)
    qc = dict(ckpt.config["quantization_config"], weight_block_size=list(block))
    quant_config = Fp8Config.from_config(qc)
    source = _TensorReader(ckpt, planned)
    ref = _TensorReader(reference or ckpt)
    # The MoE layer reads serving options (get_exec()): give it a CPU server's defaults, in a
    # context of its own so that nothing process-wide changes.
    context = create_context(ServerArgs(model_path=str(ckpt.folder), device="cpu"), role="scheduler")
    with torch.no_grad(), use_context(context):
        for kind in kinds:
            report.kinds.append(_check_kind(kind, ckpt.config, quant_config, block, tp, ep, source, ref, get_parallel))
    return report


def _cached(read: Callable) -> Callable:
    """`read`, remembering each name's result."""
    seen: dict[str, object] = {}

    def get(name: str):
        if name not in seen:
            seen[name] = read(name)
        return seen[name]
    return get


def _check_kind(kind: LayerKind, config: dict, quant_config, block: tuple[int, int], tp: int, ep: bool,
                source: _TensorReader, ref: _TensorReader, get_parallel) -> KindResult:
    """Build and load one layer kind on every rank; on ranks 0, 1 and the last, compare what the
    rank holds, dequantized, with the reference loaded by the same loaders into an unquantized twin."""
    result = KindResult(kind.kind, kind.prefix, tp)
    started = time.monotonic()
    tensor, ref_tensor = _cached(source.get), _cached(ref.get)   # each tensor read once per kind
    compare = sorted({0, 1, tp - 1})
    for rank in range(tp):
        with get_parallel().override(**_pose_as(tp, rank, ep)):
            try:
                module = _sglang_module(kind, config, quant_config, tp, ep)
                _sglang_load(module, kind, tensor, rank, ep)
            except ConversionError:
                raise
            except Exception as e:     # the engine's own refusal (any type), reported with its text
                result.failed_ranks += 1
                if result.error is None:
                    result.error = f"{kind.weights[0]}.weight: rank {rank}: {type(e).__name__}: {e}".rstrip(": ")
                continue
            result.loaded += 1
            if rank in compare and result.mismatch is None:
                result.compared_ranks.append(rank)
                problem = _compare_rank(module, kind, config, tp, ep, rank, block, ref, ref_tensor)
                if problem:
                    result.mismatch = f"rank {rank}: {kind.prefix}: {problem}"
    result.seconds = time.monotonic() - started
    return result


def print_engine_report(report: EngineReport) -> None:
    """Per layer kind: loads on N/N ranks (and the ranks compared bit for bit), or the engine's error."""
    mode = f"TP{report.tp}" + (" with EP" if report.ep else "")
    print(f"engine check: {report.engine} {report.version}, {mode}, {report.what} "
          f"({block_name(report.block)} blocks, {report.architecture}): {report.folder}")
    if report.unsupported:
        print(f"  NOT CHECKED: {report.unsupported}")
        return
    width = max([len(k.kind) for k in report.kinds] + [10])
    for k in report.kinds:
        if k.error:
            status = f"FAILS on {k.failed_ranks}/{k.ranks} ranks: {k.error}"
        else:
            status = f"loads on {k.loaded}/{k.ranks} ranks"
            if k.mismatch:
                status += f"; DEQUANTIZES DIFFERENTLY: {k.mismatch}"
            elif k.compared_ranks:
                status += f", dequantizes bit-identically to the input on ranks {', '.join(map(str, k.compared_ranks))}"
        print(f"  {k.kind:<{width}}  {k.prefix}: {status} ({k.seconds:.1f} s)")
    if report.unchecked:
        print(f"  NOT CHECKED (no {report.engine} layer built for them): {', '.join(report.unchecked[:5])}"
              + (f" and {len(report.unchecked) - 5} more" if len(report.unchecked) > 5 else ""))
    verdict = "every layer kind loads" if report.ok else "does NOT load as a whole"
    print(f"  {report.what}: {verdict} at {mode} with {report.engine} {report.version}")


def engine_reports(args: argparse.Namespace, ckpt: Checkpoint, plan: Plan | None) -> list[EngineReport]:
    """The --engine step of a run: with no plan (the input already works at --tp) check the input;
    with --dry-run check the input as it is and then the planned output (scales resized in memory,
    nothing written); with --verify check the written output against the input."""
    if plan is None:
        return [engine_check(ckpt, args.tp, args.ep, args.engine, what="input")]
    if args.dry_run:
        return [engine_check(ckpt, args.tp, args.ep, args.engine, what="input as it is"),
                engine_check(ckpt, args.tp, args.ep, args.engine, planned=plan.target_block,
                             what=f"planned {block_name(plan.target_block)} output")]
    return [engine_check(read_checkpoint(plan.output_dir), args.tp, args.ep, args.engine, reference=ckpt)]


def report_engine(reports: list[EngineReport], printed: bool = False) -> int:
    """Print the reports (unless already printed as JSON); exit code 1 if the last one (what the
    run produced or plans to produce) does not load on every rank. The input as it is failing
    under --dry-run is what the conversion is for, not an error."""
    if not printed:
        for report in reports:
            print_engine_report(report)
    return 0 if reports and reports[-1].ok else 1


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

EXAMPLES = """\
examples:
  resize-block-size /models/DeepSeek-V3
      writes /models/DeepSeek-V3-Block64x64 (64x64 blocks, servable at TP32)
  resize-block-size /models/DeepSeek-V3 --tp 32 --dry-run
      which block TP32 needs, the plan and the disk it takes; nothing is written
  resize-block-size /models/DeepSeek-V3 --block-size 32 -o /data/DeepSeek-V3-b32 --verify
      32x32 blocks (TP64) into a folder of your choice, then compare every byte with the input
  resize-block-size /models/DeepSeek-V3 --in-place
      no room for a second copy: convert the folder itself (--restore undoes it exactly)

Re-run the same command after an interruption: finished shards are kept, the rest is written.
"""


def default_output(input_dir: Path, target: tuple[int, int]) -> Path:
    """The sibling folder `INPUT-Block64x64`.

    >>> default_output(Path("/m/DeepSeek-V3/"), (64, 64)).as_posix()
    '/m/DeepSeek-V3-Block64x64'
    """
    base = Path(os.path.abspath(input_dir))
    return base.with_name(f"{base.name}-Block{block_name(target)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Resize the quantization blocks of a block-FP8 checkpoint (DeepSeek-V3/R1, Kimi-K2, "
                    "Qwen3-FP8, MiniMax-M2, ...) by replicating its scales. Lossless: every weight "
                    "dequantizes to exactly the same value. The input folder is never modified.")
    p.add_argument("input", metavar="INPUT", help="model folder with config.json and .safetensors shards")
    p.add_argument("-o", "--output", metavar="OUTPUT",
                   help="output folder (default: INPUT-Block64x64 next to INPUT, named after the block)")
    p.add_argument("--block-size", metavar="B",
                   help="target block: 64, 64x64 or 64,128 (rows x cols); must divide the source block "
                        "(default: 64)")
    p.add_argument("--tp", type=int, metavar="N",
                   help="pick the largest block that tensor parallelism over N GPUs can load; "
                        "exits without writing if the checkpoint already works at TP N")
    p.add_argument("--ep", action="store_true",
                   help="with --tp: experts are placed by expert parallelism, not split")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and the TP table, write nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as one JSON object")
    p.add_argument("--verify", action="store_true",
                   help="convert if needed, then compare every output tensor and file with the input")
    p.add_argument("--engine", choices=ENGINES,
                   help="with --tp N and --verify or --dry-run: load the output (or, with --dry-run, the input "
                        "as it is and the planned output) with the engine's own layers and weight loaders on "
                        "every one of the N ranks, on this CPU, and report each layer kind. Needs the engine "
                        "installed. Supported: "
                        + "; ".join(f"{e}: {', '.join(a)}" for e, a in ENGINE_ARCHITECTURES.items()))
    p.add_argument("--in-place", action="store_true",
                   help="convert INPUT itself, one shard at a time (extra disk: one shard); "
                        "--restore gives back the original files byte for byte")
    p.add_argument("--restore", action="store_true",
                   help="undo an --in-place conversion: every file byte-identical to the original")
    p.add_argument("--force", action="store_true",
                   help="rewrite every shard, also those an earlier run of the same conversion finished")
    p.add_argument("--no-reflink", action="store_true",
                   help="always copy bytes, never share them with the input (XFS/btrfs copy-on-write)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="shards converted in parallel (default: 1; the disk is the limit)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def describe_plan(plan: Plan, advice: TPAdvice) -> dict:
    """The plan as data: what --dry-run --json prints."""
    examples: dict[tuple, dict] = {}
    for s in plan.shards:
        for p in s.scales:
            examples.setdefault((p.resize.old_shape, p.resize.new_shape), {
                "tensor": p.name, "weight_shape": list(p.resize.weight_shape), "dtype": p.dtype,
                "scale_before": list(p.resize.old_shape), "scale_after": list(p.resize.new_shape)})
    out = plan.output_dir
    free_at = next((d for d in (out, *out.parents) if d.exists()), None)
    return {
        "input": str(plan.input_dir), "output": str(out),
        "source_block": list(plan.source_block), "target_block": list(plan.target_block),
        "shards": len(plan.shards), "fp8_weights": plan.fp8_weights, "scales": plan.scale_count,
        "bytes_in": sum(s.source_size for s in plan.shards) + sum(f.size for f in plan.other_files),
        "bytes_out": plan.bytes_out,
        "bytes_shareable": sum(s.shareable_bytes() for s in plan.shards),
        "free_bytes": shutil.disk_usage(free_at).free if free_at else None,
        "other_files": len(plan.other_files),
        "scale_examples": list(examples.values()),
        "in_place_extra_bytes": in_place_extra_bytes(plan.shards),
        "tp": advice.table(ep=False), "tp_ep": advice.table(ep=True),
        "tp_unknown_weights": advice.unknown,
    }


def print_plan(info: dict) -> None:
    print(f"plan: {info['input']} -> {info['output']}")
    print(f"  blocks          {block_name(info['source_block'])} -> {block_name(info['target_block'])}")
    print(f"  shards          {info['shards']} ({info['fp8_weights']} FP8 weights, {info['scales']} scales to resize, "
          f"{info['other_files']} other files to copy)")
    for ex in info["scale_examples"]:
        print(f"    e.g. {ex['tensor']}: weight {ex['weight_shape']}, "
              f"scale {ex['scale_before']} -> {ex['scale_after']} {ex['dtype']}")
    print(f"  bytes to write  {human_bytes(info['bytes_out'])} "
          f"(copy-on-write filesystems share {human_bytes(info['bytes_shareable'])} of it with the input)")
    if info.get("in_place"):
        print(f"  in place: peak extra disk {human_bytes(info['in_place_extra_bytes'])} (the largest new shard)")
    if info["free_bytes"] is not None:
        print(f"  free space      {human_bytes(info['free_bytes'])}")
    print("  largest block each tensor-parallel degree can load (EP: experts not split):")
    print("    ranks" + "".join(f"{tp:>6}" for tp in info["tp"]))
    for key, label in (("tp", "TP   "), ("tp_ep", "TP+EP")):
        print(f"    {label}" + "".join(f"{edge or '-':>6}" for edge in info[key].values()))
    if info["tp_unknown_weights"]:
        print(f"  unknown layer names, assumed split on both dims: {', '.join(info['tp_unknown_weights'][:5])}"
              + (" ..." if len(info["tp_unknown_weights"]) > 5 else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return run(args)
    except ConversionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print(f"{PROG}: interrupted; finished shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    except OSError as e:
        print(f"{PROG}: error: {_describe_os_error(e)}", file=sys.stderr)
        return 1


def check_flags(args: argparse.Namespace) -> None:
    """Refuse combinations of options that make no sense, before reading anything."""
    if args.tp is not None and args.block_size is not None:
        raise ConversionError("give --tp or --block-size, not both")
    if (args.tp is not None and args.tp < 1) or args.workers < 1:
        raise ConversionError("--tp and --workers take a positive number")
    if args.ep and args.tp is None:
        raise ConversionError("--ep goes with --tp N")
    if args.restore and (args.in_place or args.output or args.block_size or args.tp or args.verify or args.dry_run):
        raise ConversionError("--restore takes only INPUT: it gives back the files an --in-place run replaced")
    if args.in_place and args.output:
        raise ConversionError("--in-place converts INPUT itself; it takes no -o")
    if args.engine and (args.tp is None or not (args.verify or args.dry_run) or args.in_place):
        raise ConversionError("--engine checks at a tensor-parallel degree: give --tp N and --verify or --dry-run "
                              "(not --in-place)")
    if args.in_place and args.verify:
        raise ConversionError("--verify compares the output with the input, which --in-place replaces; "
                              "convert to a separate folder to verify, or use --restore to undo")


def pick_target(args: argparse.Namespace, ckpt: Checkpoint, advice: TPAdvice) -> tuple[int, int] | None:
    """The target block from --tp or --block-size; None when --tp finds nothing to do."""
    if args.tp is None:
        return parse_block_size(args.block_size or "64")
    target = choose_block_for_tp(advice, args.tp, args.ep)
    mode = f"TP{args.tp}" + (" with --ep" if args.ep else "")
    if target is None:
        print(f"the checkpoint's {block_name(ckpt.source_block)} blocks already load at {mode}; nothing to convert")
    elif not (args.quiet or args.json):
        print(f"{mode} needs {block_name(target)} blocks: {advice.failure(args.tp, args.ep, ckpt.source_block)}")
    return target


def run(args: argparse.Namespace) -> int:
    """The command: validate and plan, then dry-run, convert (to a new folder or in place),
    verify, or restore."""
    check_flags(args)
    if args.engine:
        import_engine(args.engine)                # before anything is read or written
    input_dir = Path(args.input)
    copy_method = "no-share" if args.no_reflink else "auto"
    if args.restore:
        summary = restore_in_place(input_dir, copy=copy_method, quiet=args.quiet)
        if not args.quiet:
            print(f"restored {summary.shards_written} shards of {input_dir} ({summary.shards_kept} were already "
                  f"original): every file is byte-identical to the original, {summary.seconds:.1f} s")
        return 0
    recorded = load_in_place_state(input_dir) if args.in_place and input_dir.is_dir() else None
    ckpt = recorded[0] if recorded else read_checkpoint(input_dir)
    if args.in_place:
        ckpt = dataclasses.replace(ckpt, others=[])   # other files stay where they are
    advice = advise_tp(ckpt)
    if recorded and args.block_size is None and args.tp is None:
        target = recorded[1]                      # re-running a plain --in-place resumes its run
    else:
        target = pick_target(args, ckpt, advice)
        if target is None:
            return report_engine(engine_reports(args, ckpt, None)) if args.engine else 0
    if recorded and target != recorded[1]:
        raise _fail(input_dir, f"was converted in place to {block_name(recorded[1])}; run --restore first "
                               f"to convert it to {block_name(target)}")
    if args.in_place:
        output_dir = input_dir
    else:
        output_dir = Path(args.output) if args.output else default_output(input_dir, target)
    plan = make_plan(ckpt, output_dir, target)
    if not args.in_place:
        check_output_location(input_dir, output_dir)
    if args.dry_run:
        info = describe_plan(plan, advice)
        info["in_place"] = bool(args.in_place)
        checks = engine_reports(args, ckpt, plan) if args.engine else []
        if checks:
            info["engine_check"] = [dataclasses.asdict(r) | {"ok": r.ok} for r in checks]
        print(json.dumps(info, indent=2)) if args.json else print_plan(info)
        return report_engine(checks, printed=args.json) if args.engine else 0
    if args.in_place:
        summary = convert_in_place(ckpt, target, recorded=bool(recorded), copy=copy_method,
                                   quiet=args.quiet)
        if not args.quiet:
            print_summary(plan, summary)
        return 0
    # --verify checks an output that no run is working on as it is, and never "repairs" it.
    finished = (output_dir.is_dir() and any(output_dir.iterdir())
                and not os.path.lexists(output_dir / STATE_DIR))
    if not (args.verify and finished):
        summary = convert(plan, force=args.force, copy=copy_method, workers=args.workers,
                          quiet=args.quiet)
        if not args.quiet:
            print_summary(plan, summary)
    if args.verify:
        code = report_verification(plan, input_dir, verify_output(plan, quiet=args.quiet))
        return max(code, report_engine(engine_reports(args, ckpt, plan))) if args.engine else code
    return 0


def report_verification(plan: Plan, input_dir: Path, report: VerifyReport) -> int:
    for problem in report.problems[:20]:
        print(f"{PROG}: verify: {problem}", file=sys.stderr)
    if report.problems:
        more = len(report.problems) - 20
        print(f"{PROG}: error: {plan.output_dir} does NOT match {input_dir}: {len(report.problems)} problem(s)"
              + (f", {more} not shown" if more > 0 else ""), file=sys.stderr)
        return 1
    print(f"verified {plan.output_dir}: {report.tensors_equal} tensors byte-identical, "
          f"{report.scales_replicated} scales exact replications, {report.files_equal} files equal "
          f"({human_bytes(report.bytes_compared)} compared)")
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def _describe_os_error(e: OSError) -> str:
    where = e.filename or "output"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: disk full; the partial file was removed. Free space and re-run the same command to resume"
    if e.errno == errno.EFBIG:
        return f"{where}: file too large for this filesystem or ulimit -f; the partial file was removed. " \
               "Raise the limit and re-run the same command to resume"
    return f"{where}: {e.strerror or e}"


def print_summary(plan: Plan, s: Summary) -> None:
    if s.method == "already complete" or (s.shards_written == 0 and s.shards_kept == len(plan.shards)):
        print(f"{plan.output_dir}: already converted to {block_name(plan.target_block)}; nothing to do")
        return
    kept = f", {s.shards_kept} kept from an earlier run" if s.shards_kept else ""
    where = " in place" if s.method == "in-place" else ""
    print(f"converted {s.shards_written} shards{where}{kept}: {s.scales} scales resized "
          f"{block_name(plan.source_block)} -> {block_name(plan.target_block)}, "
          f"{human_bytes(s.bytes_written)} written ({human_bytes(s.bytes_shared)} shared with the input), "
          f"{s.seconds:.1f} s -> {plan.output_dir}")


def main_exit() -> None:
    """Entry point of the `resize-block-size` console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
