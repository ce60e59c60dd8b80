"""Give a block-FP8 checkpoint smaller quantization blocks, exactly.

In:  a Hugging Face model folder quantized in blocks (DeepSeek-V3/R1 style): every FP8
     `X.weight` [N, K] has an `X.weight_scale_inv` [ceil(N/bn), ceil(K/bk)] and config.json says
     `quantization_config.weight_block_size: [bn, bk]` (usually [128, 128]).
     compressed-tensors FP8_BLOCK (`X.weight_scale`, `block_structure`) is converted the same way.
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
import contextlib
import dataclasses
import enum
import errno
import fcntl
import hashlib
import importlib.util
import itertools
import json
import math
import mmap
import os
import re
import shlex
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
from typing import Callable, Literal


__version__ = "0.1.0"
PROG = "resize-block-size"

# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

# Bits per element of every dtype the safetensors format defines (sub-byte types included so a
# header using them is read correctly even though they are never scales or resized).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,           # AMD's FP8 variants (safetensors >= 0.7)
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# The block grid of a scale does not depend on the FP8 element format, so every variant resizes.
FP8_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
SCALE_DTYPES = {"F32", "BF16", "F16", "F64", "F8_E8M0"}
SCALE_SUFFIX = "_scale_inv"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
STATE_DIR = ".resize_block_size"      # inside OUTPUT while a run is unfinished, in INPUT after --in-place
MAX_HEADER_BYTES = 100_000_000        # the limit the safetensors library itself enforces
MAX_JSON_BYTES = 100_000_000          # config.json and the index: far above any real one
MAX_JSON_DEPTH = 100                  # nesting of config.json and the index (real ones: under 10)
MIN_BLOCK = 16                        # engine GEMM kernels (tl.dot) need K tiles of >= 16
# Replicating scales allocates (block ratio) x (scale size): a bound on block edges keeps that
# within memory (a config saying [2**62, 2**62] is refused, not a MemoryError mid-run). Engines
# use 128; no block-FP8 format uses edges anywhere near this.
MAX_BLOCK = 1 << 16
# Output data is laid out so that large unchanged byte runs keep their source offset modulo this,
# which lets XFS/btrfs share them (reflink). 4096 is the block size of every common filesystem;
# a fixed value keeps the output bytes independent of where the tool runs.
ALIGN = 4096
COPY_CHUNK = 64 << 20                 # bytes per copy call: bounds latency of Ctrl-C and progress
BUFFER_BYTES = 8 << 20                # bytes per read of the buffered copy loop
# Bytes per O_DIRECT write, and the size of each worker's scratch buffer. While one runs, its
# mapped source pages count in the process RSS, so this bounds memory; larger chunks were no
# faster (bench/RESULTS.md has the comparison).
DIRECT_CHUNK = 32 << 20


class ConversionError(Exception):
    """A problem the user can act on; printed as one line, exit code 1."""

    def __init__(self, message: object = "") -> None:
        # One line whatever a file or tensor name holds (a newline in a name is legal).
        super().__init__(str(message).replace("\n", " ").replace("\r", " "))


class UsageError(ConversionError):
    """Options that are malformed or do not go together; exit code 2, like argparse's own."""


class Interrupted(Exception):
    """Raised in worker threads when the main thread asks them to stop."""


def _fail(where: object, problem: str) -> ConversionError:
    return ConversionError(f"{where}: {problem}")


# ---------------------------------------------------------------------------------------------
# Block math: pure functions
# ---------------------------------------------------------------------------------------------

def parse_block_size(text: str) -> tuple[int, int]:
    """Parse a block size given on the command line.

    >>> parse_block_size("64"), parse_block_size("64x64"), parse_block_size("64,128")
    ((64, 64), (64, 64), (64, 128))
    """
    # ASCII digits only: str.isdigit() and int() also take "²" or "٦٤", which no one means.
    match = re.fullmatch(r"\s*([0-9]+)(?:(?:\s*[xX,]\s*|\s+)([0-9]+))?\s*", text, re.ASCII)
    if not match:
        raise UsageError(
            f"--block-size {text!r}: expected one or two positive integers, like 64, 64x64 or 64,128")
    sizes = [int(p) for p in match.groups() if p is not None]
    if min(sizes) <= 0:
        raise UsageError(f"--block-size {text!r}: block sizes must be positive")
    if max(sizes) > MAX_BLOCK:
        raise UsageError(f"--block-size {text!r}: block sizes above {MAX_BLOCK} are not supported")
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
# (repeat_interleave) gives the same bytes, but importing it on every run would cost more time and
# memory than converting a whole shard takes on copy-on-write filesystems.
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

# slots=True on the per-tensor classes: a shard header can hold hundreds of thousands of tensors,
# and an instance without a __dict__ is a fraction of the size.
@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a shard header; `begin`/`end` are absolute byte offsets in the file."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class FileIdentity:
    """Which file a path named when it was read: a file replaced (rename, re-download) or
    rewritten since then differs in one of these."""
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class ShardHeader:
    name: str                       # file name relative to the checkpoint folder
    path: Path
    size: int
    metadata: dict[str, str] | None
    tensors: list[TensorEntry]      # in data order
    prefix: bytes                   # the file's first bytes: 8-byte length + header JSON
    identity: FileIdentity | None = None    # the file the header was read from, if read from one


def open_regular(path: Path) -> int:
    """Open `path` (following symlinks) for reading, refusing anything but a regular file.

    O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, forever. It changes
    nothing for regular files.
    """
    try:
        if stat.S_ISREG(os.stat(path).st_mode):       # never open a device: opening may act
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            fd = -1
    except OSError as e:
        what = "is a broken symlink" if os.path.islink(path) and not os.path.exists(path) else "cannot be read"
        raise _fail(path, f"{what} ({e.strerror or e}); fix its permissions or the download")
    try:
        mode = os.fstat(fd).st_mode if fd >= 0 else 0
    except OSError as e:
        os.close(fd)
        raise _fail(path, f"cannot read: {e.strerror or e}")
    if not stat.S_ISREG(mode):
        if fd >= 0:
            os.close(fd)
        raise _fail(path, "is not a regular file (a folder, fifo, socket or device); remove it from the "
                          "model folder or replace it with the real file")
    return fd


def _read_all(fd: int, limit: int) -> bytes | None:
    """The whole file behind `fd`, or None if it is longer than `limit` bytes."""
    chunks, size = [], 0
    while True:
        chunk = os.read(fd, min(1 << 20, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None


def json_depth_exceeds(value: object, limit: int) -> bool:
    """True if `value` nests lists/objects deeper than `limit`; iterative, so any depth is safe.

    >>> json_depth_exceeds({"a": [[1]]}, 3), json_depth_exceeds({"a": [[1]]}, 2)
    (False, True)
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _read_json_file(path: Path, label: str) -> tuple[str, object]:
    fd = open_regular(path)
    try:
        raw = _read_all(fd, MAX_JSON_BYTES)
    except OSError as e:
        raise _fail(path, f"cannot read {label}: {e.strerror or e}")
    finally:
        os.close(fd)
    if raw is None:
        raise _fail(path, f"{label} is larger than {MAX_JSON_BYTES} bytes; this is not a model's {label}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, f"{label} is not UTF-8 text")
    try:
        value = json.loads(text)
    except RecursionError:
        raise _fail(path, f"{label} nests JSON too deeply to be a model's {label}; fix or re-download it")
    except ValueError as e:
        raise _fail(path, f"{label} is not valid JSON ({e}); fix or re-download it")
    if json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise _fail(path, f"{label} nests JSON more than {MAX_JSON_DEPTH} levels deep; fix or re-download it")
    return text, value


# Where engines look for the quantization settings: config.json's top level, and for multimodal
# wrappers (Qwen3.5/3.6 `...ForConditionalGeneration`) the text model's sub-config. Every copy
# found is read, checked to agree, and rewritten, so no engine can pick up a stale block size.
QUANT_KEY = "quantization_config"
CT_METHOD = "compressed-tensors"
CT_SCALE_SUFFIX = "_scale"            # compressed-tensors FP8_BLOCK: X.weight + X.weight_scale
# Families whose block-FP8 layers cannot be served at another block (see read_quant_format).
V4_MODEL_TYPES = {"deepseek_v4", "deepseek_v41"}
V4_REFUSAL = ("this is DeepSeek-V4 (model_type {model_type}): its routed experts are MXFP4 and both SGLang and "
              "vLLM apply the scales of its attention output projection (wo_a) in hard-coded 128x128 tiles, so a "
              "resized checkpoint fails to load or computes with wrong scales; not converted. Serve it as it is: "
              "use expert parallelism (--ep / --enable-expert-parallel) instead of a higher TP degree, vLLM's "
              "shared-expert padding, or cap TP at 8 (V4-Pro)")


@dataclass(frozen=True)
class QuantFormat:
    """How a checkpoint stores its block scales, as config.json declares it."""
    method: str                             # "fp8" (DeepSeek style) or "compressed-tensors" (FP8_BLOCK)
    block: tuple[int, int]
    locations: tuple[tuple[str, ...], ...]  # key path of the object holding each quantization_config

    @property
    def scale_suffix(self) -> str:
        """What the scale of `X.weight` is named after `X.weight`."""
        return CT_SCALE_SUFFIX if self.method == CT_METHOD else SCALE_SUFFIX


QUANT_SEARCH_DEPTH = 3                # thinker_config.text_config (Qwen3-Omni) is two levels down


def quant_config_locations(config: dict) -> list[tuple[str, ...]]:
    """Key paths of every object holding a quantization_config: () for the top level, then
    sub-configs such as ("text_config",), breadth first, a few levels deep.

    >>> quant_config_locations({"quantization_config": {}, "text_config": {"quantization_config": {}},
    ...                         "thinker_config": {"text_config": {"quantization_config": {}}}})
    [(), ('text_config',), ('thinker_config', 'text_config')]
    """
    found, level = [], [((), config)]
    for _ in range(QUANT_SEARCH_DEPTH):
        found += [path for path, node in level if node.get(QUANT_KEY) is not None]
        level = [((*path, k), v) for path, node in level for k, v in node.items()
                 if k != QUANT_KEY and isinstance(v, dict)]
    return found


def _location_name(location: tuple[str, ...]) -> str:
    return ".".join((*location, QUANT_KEY))


def _block_pair(value: object) -> tuple[int, int] | None:
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in value)):
        return (value[0], value[1])
    return None


def _bounded_block(block: tuple[int, int], path: Path, what: str) -> tuple[int, int]:
    """`block`, or a refusal if an edge is above MAX_BLOCK (see there)."""
    if max(block) > MAX_BLOCK:
        raise _fail(path, f"{what} is {json.dumps(list(block))}: blocks above {MAX_BLOCK} are not "
                          "a block-FP8 format any engine loads; is config.json right?")
    return block


def _check_not_v4(config: dict, path: Path) -> None:
    """Refuse DeepSeek-V4 / V4.1 by their config before any tensor is looked at."""
    texts = [config, config.get("text_config")]
    for c in [c for c in texts if isinstance(c, dict)]:
        model_type = c.get("model_type")
        if model_type in V4_MODEL_TYPES:
            raise _fail(path, V4_REFUSAL.format(model_type=model_type))
        qcs = [c, c.get(QUANT_KEY)]
        for q in [q for q in qcs if isinstance(q, dict)]:
            if q.get("expert_dtype") not in (None, "fp8", "bf16", "bfloat16"):
                raise _fail(path, f"expert_dtype is {q['expert_dtype']!r}: the routed experts use another "
                                  "quantization than block-FP8 (DeepSeek-V4 style MXFP4); converting only the "
                                  "FP8 layers would give a checkpoint no engine serves at the new block. Not "
                                  "converted; use expert parallelism instead of a higher TP degree")


def _fp8_block(qc: dict, path: Path, where: str) -> tuple[int, int]:
    if "weight_block_size" not in qc or qc["weight_block_size"] is None:
        raise _fail(path, f"{where} has no weight_block_size: this FP8 checkpoint is not "
                          "block-quantized, there are no blocks to resize")
    block = _block_pair(qc["weight_block_size"])
    if block is None:
        raise _fail(path, f"weight_block_size is {json.dumps(qc['weight_block_size'])}, expected two positive "
                          "integers like [128, 128]")
    return _bounded_block(block, path, "weight_block_size")


def _compressed_tensors_block(qc: dict, path: Path, where: str) -> tuple[int, int]:
    """The block of a compressed-tensors FP8_BLOCK config; refuses every other scheme."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _fail(path, f"{where} (compressed-tensors) has no config_groups, so how it is quantized is unknown; "
                          "not supported")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _fail(path, f"{where}: quantization_status is {status!r}, not 'compressed': the weights are not "
                          "stored as FP8 blocks")
    blocks = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise _fail(path, f"{where}: config group {name} has no weights scheme; cannot tell how it is "
                              "quantized")
        scheme = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
        fmt = group.get("format") or qc.get("format")
        if scheme != ("float", 8, "block") or fmt not in (None, "float-quantized"):
            raise _fail(path, f"{where}: config group {name} quantizes weights as {scheme[0]} {scheme[1]}-bit, "
                              f"strategy {scheme[2]} (format {fmt}): only FP8_BLOCK (float 8-bit, strategy "
                              "block) has blocks to resize; this checkpoint is not converted")
        block = _block_pair(weights.get("block_structure"))
        if block is None:
            raise _fail(path, f"{where}: config group {name}: block_structure is "
                              f"{json.dumps(weights.get('block_structure'))}, expected two positive integers")
        blocks.add(_bounded_block(block, path, f"{where}: config group {name}: block_structure"))
    if len(blocks) != 1:
        raise _fail(path, f"{where}: config groups use different blocks {sorted(blocks)}; one block per "
                          "checkpoint is supported")
    return blocks.pop()


def read_quant_format(config: object, path: Path) -> QuantFormat:
    """The scale format and block size config.json declares, after checking it is a block-FP8
    checkpoint; every quantization_config (top level, text_config) must say the same."""
    if not isinstance(config, dict):
        raise _fail(path, "config.json is not a JSON object")
    _check_not_v4(config, path)
    locations = quant_config_locations(config)
    if not locations:
        raise _fail(path, "no quantization_config: this model is not quantized, there are no blocks to resize")
    found: list[tuple[str, tuple[int, int]]] = []
    for location in locations:
        where = _location_name(location)
        qc = config
        for key in location:
            qc = qc[key]
        qc = qc[QUANT_KEY]
        if not isinstance(qc, dict):
            raise _fail(path, f"{where} is not a JSON object")
        method = qc.get("quant_method")
        if method == "fp8":
            found.append((method, _fp8_block(qc, path, where)))
        elif method == CT_METHOD:
            found.append((method, _compressed_tensors_block(qc, path, where)))
        else:
            raise _fail(path, f"{where}: quant_method is {method!r}, expected 'fp8' (block-FP8 with "
                              "weight_scale_inv) or 'compressed-tensors' (FP8_BLOCK); not supported")
    if len(set(found)) > 1:
        described = ", ".join(f"{_location_name(loc)} says {m} {block_name(b)}"
                              for loc, (m, b) in zip(locations, found))
        raise _fail(path, f"the quantization_config copies disagree ({described}); engines read different ones, "
                          "so it is unclear which is right. Make them agree and re-run")
    method, block = found[0]
    return QuantFormat(method, block, tuple(locations))


def block_config_problem(path: Path, target: tuple[int, int],
                         locations: tuple[tuple[str, ...], ...]) -> str | None:
    """Why the config.json at `path` does not declare `target` blocks in every place the input
    declared its block (checked on its own, not against the planned text), or None."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        fmt = read_quant_format(config, path)
    except (OSError, ValueError) as e:
        return f"{path.name}: cannot read its quantization_config ({e})"
    except ConversionError as e:
        return str(e)
    if fmt.block != target or fmt.locations != locations:
        found, wanted = (", ".join(map(_location_name, places)) for places in (fmt.locations, locations))
        return (f"{path.name}: declares {block_name(fmt.block)} blocks in {found}; "
                f"expected {block_name(target)} in {wanted}")
    return None


def read_source_block(config: object, path: Path) -> tuple[int, int]:
    """The block size a config.json declares, after checking it is a block-FP8 checkpoint."""
    return read_quant_format(config, path).block


def new_block_config(config: dict, fmt: QuantFormat, target: tuple[int, int]) -> dict:
    """A copy of `config` with every quantization_config set to `target` blocks: fp8's
    weight_block_size; compressed-tensors' block_structure of every block group, and the
    activation group_size (engines derive the activation group from the block's K edge)."""
    new = json.loads(json.dumps(config))
    for location in fmt.locations:
        holder = new
        for key in location:
            holder = holder[key]
        qc = holder[QUANT_KEY]
        if fmt.method == "fp8":
            qc["weight_block_size"] = list(target)
            continue
        for group in qc["config_groups"].values():
            group["weights"]["block_structure"] = list(target)
            act = group.get("input_activations")
            if isinstance(act, dict) and act.get("strategy") == "group":
                act["group_size"] = target[1]
    return new


def read_shard_header(path: Path, name: str) -> ShardHeader:
    """Read and check a safetensors header without touching tensor data.

    Every tensor must have a known dtype, a byte length matching its shape, and the tensors must
    tile the data area exactly (no hole, no overlap, nothing missing at the end).
    """
    where = name
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        size = st.st_size
        with open(fd, "rb", closefd=False) as f:
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
        raise _fail(where, f"cannot read: {e.strerror or e}")
    finally:
        os.close(fd)
    return dataclasses.replace(parse_shard_header(path, name, size, prefix + raw), identity=FileIdentity.of(st))


def parse_shard_header(path: Path, name: str, size: int, prefix: bytes) -> ShardHeader:
    """Check a shard's prefix (8-byte length + header JSON) against a file of `size` bytes."""
    where = name
    header_len, raw = len(prefix) - 8, prefix[8:]
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_compact_object)
    except RecursionError:
        raise _fail(where, "header nests JSON too deeply to be a safetensors header; the file is corrupt")
    except (UnicodeDecodeError, ValueError):
        raise _fail(where, "header is not valid JSON; the file is corrupt, re-download it")
    if not isinstance(header, dict):
        raise _fail(where, "header is not a JSON object; the file is corrupt, re-download it")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _fail(where, "__metadata__ must map strings to strings; the file is corrupt")
    if metadata and any(_has_surrogate(s) for kv in metadata.items() for s in kv):
        raise _fail(where, "__metadata__ holds a lone UTF-16 surrogate (not valid Unicode), which the "
                           "safetensors library refuses; the file is corrupt")
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


class _EntryInfo(tuple):
    """(dtype, shape, data_offsets) of one header entry, as parsed: a 3-tuple is a third of the
    size of the 3-key dict json.loads would build, and a header can hold 100,000s of them."""


_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))


def _compact_object(pairs: list[tuple[str, object]]) -> object:
    """json.loads' object_pairs_hook for headers: tensor entries become `_EntryInfo`s."""
    if len(pairs) == 3 and {k for k, _ in pairs} == _ENTRY_KEYS:
        info = dict(pairs)
        if isinstance(info["shape"], list) and isinstance(info["data_offsets"], list):
            return _EntryInfo((info["dtype"], info["shape"], info["data_offsets"]))
    return dict(pairs)


def _has_surrogate(text: str) -> bool:
    """True if `text` holds a lone UTF-16 surrogate: JSON's "\\ud800" escape decodes to one in
    Python, but it is not Unicode and the safetensors library (serde_json) refuses it."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _tensor_entry(where: str, name: str, info: object, data_start: int) -> TensorEntry:
    if _has_surrogate(name):
        raise _fail(where, f"{name.encode('utf-8', 'backslashreplace').decode()}: tensor name holds a lone "
                           "UTF-16 surrogate (not valid Unicode), which the safetensors library refuses; "
                           "the file is corrupt")
    if isinstance(info, _EntryInfo):
        dtype, shape, offsets = info
    elif isinstance(info, dict):
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    else:
        raise _fail(where, f"{name}: header entry is not an object")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
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

@dataclass(frozen=True, slots=True)
class ScaleResize:
    """How one scale tensor changes: from `old_block` to `new_block` (either may be larger)."""
    weight_shape: tuple[int, ...]
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    old_block: tuple[int, int]
    new_block: tuple[int, int]

    def reversed(self) -> ScaleResize:
        return ScaleResize(self.weight_shape, self.new_shape, self.old_shape,
                           self.new_block, self.old_block)


@dataclass(frozen=True, slots=True)
class Piece:
    """One tensor of an output shard: the source `tensor`'s bytes copied, or a resized scale."""
    tensor: TensorEntry             # name, dtype and where it is in the source file
    shape: tuple[int, ...]          # in the output (a resized scale's new shape)
    out_begin: int                  # absolute offset in the output file
    out_end: int
    resize: ScaleResize | None = None

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def dtype(self) -> str:
        return self.tensor.dtype

    @property
    def src_begin(self) -> int:
        return self.tensor.begin

    @property
    def src_end(self) -> int:
        return self.tensor.end


@dataclass(frozen=True, slots=True)
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
    source_prefix: bytes = b""      # the source's own prefix, as planned from
    source_identity: FileIdentity | None = None

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
    identity: FileIdentity | None = None


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
    quant_locations: tuple[tuple[str, ...], ...] = ((),)    # where config.json holds quantization_config

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


def find_shards(input_dir: Path) -> tuple[list[str], str | None, dict | None]:
    """Shard file names to convert, and the index (text and parsed) if there is one, read once.

    Every top-level `*.safetensors` that is not a folder counts: a FIFO or a dangling link under
    a shard's name is refused when its header is read, never skipped.
    """
    try:
        with os.scandir(input_dir) as entries:
            names = sorted(e.name for e in entries
                           if e.name.endswith(".safetensors") and not e.is_dir())
    except OSError as e:
        raise _fail(input_dir, f"cannot list the folder: {e.strerror or e}")
    index_path = input_dir / INDEX_NAME
    index = index_text = None
    if os.path.lexists(index_path):
        index_text, index = _read_json_file(index_path, INDEX_NAME)
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
    return names, index_text, index


@dataclass(frozen=True, slots=True)
class ScalePair:
    """An FP8 weight and its block scale, possibly in different shards."""
    weight: TensorEntry
    scale: TensorEntry


# Tensors that belong to a quantization other than block-FP8 (MXFP4/NVFP4 experts, per-tensor or
# static scales). A checkpoint holding any of them is refused as a whole: converting only its
# block-FP8 layers would give a checkpoint whose other layers no longer match its config.
OTHER_QUANT_SUFFIXES = (".weight_scale_2", ".weight_global_scale", ".input_global_scale", ".weight_packed",
                        ".input_scale", ".weight_zero_point", ".weight_g_idx")
PACKED_DTYPES = {"I8", "U8", "F4"}


def other_quantization(where: dict[str, tuple[str, TensorEntry]], suffix: str) -> list[str]:
    """Names of the tensors that show another quantization than block-FP8 with `suffix` scales:
    DeepSeek-V4 style `X.scale` (E8M0, MXFP4 experts packed as I8), NVFP4 second-level scales,
    static input scales, integer weights that carry a scale."""
    found = []
    for name, (_, t) in where.items():
        if name.endswith(OTHER_QUANT_SUFFIXES):
            found.append(name)
        elif name.endswith(".scale") and name[: -len(".scale")] + ".weight" in where:
            found.append(name)
        elif t.dtype in PACKED_DTYPES and any(name + s in where for s in (suffix, SCALE_SUFFIX, CT_SCALE_SUFFIX)):
            found.append(name)
    return sorted(found)


def pair_scales(headers: list[ShardHeader], source: tuple[int, int],
                suffix: str = SCALE_SUFFIX) -> tuple[dict[str, ScalePair], int]:
    """Match every `X` + `suffix` scale (`X.weight_scale_inv`, or compressed-tensors'
    `X.weight_scale`) with `X`, across shards, and check both shapes for `source` blocks.

    Returns the pairs by scale name and the number of FP8 weights.
    """
    where: dict[str, tuple[str, TensorEntry]] = {}
    for h in headers:
        for t in h.tensors:
            if t.name in where:
                raise _fail(h.name, f"{t.name}: also stored in {where[t.name][0]}; a tensor must be in one shard")
            where[t.name] = (h.name, t)
    mixed = other_quantization(where, suffix)
    if mixed:
        shard, t = where[mixed[0]]
        more = f" and {len(mixed) - 3} more" if len(mixed) > 3 else ""
        raise _fail(shard, f"{', '.join(mixed[:3])}{more} ({mixed[0]}: {t.dtype} {list(t.shape)}) belong to "
                           "another quantization than "
                           "block-FP8 (MXFP4/NVFP4 experts, DeepSeek-V4 `.scale` tensors, static or per-tensor "
                           "scales); converting only the block-FP8 layers would leave a checkpoint no engine "
                           "loads at the new block. Not converted")
    # compressed-tensors' `_scale` also ends kv-cache scales (`k_scale`): only `X.weight_scale` pairs.
    scale_end = suffix if suffix == SCALE_SUFFIX else ".weight" + suffix
    pairs: dict[str, ScalePair] = {}
    fp8 = 0
    for h in headers:
        for t in h.tensors:
            if t.name.endswith(scale_end):
                weight = where.get(t.name[: -len(suffix)])
                _check_scale(h.name, t, weight and weight[1], source, suffix)
                pairs[t.name] = ScalePair(weight[1], t)
            elif t.dtype in FP8_DTYPES:
                fp8 += 1
                if t.name + suffix not in where:
                    other = CT_SCALE_SUFFIX if suffix == SCALE_SUFFIX else SCALE_SUFFIX
                    hint = ""
                    if t.name + other in where:
                        hint = (" (found a compressed-tensors style `_scale` instead)" if other == CT_SCALE_SUFFIX
                                else " (found a DeepSeek style `_scale_inv` instead)")
                    raise _fail(h.name, f"{t.name}: FP8 tensor without {t.name + suffix}{hint}; "
                                        "cannot resize its blocks, the checkpoint is incomplete or not block-FP8")
    return pairs, fp8


def _check_scale(shard: str, scale: TensorEntry, w: TensorEntry | None, source: tuple[int, int],
                 suffix: str = SCALE_SUFFIX) -> None:
    name = scale.name
    if w is None:
        raise _fail(shard, f"{name}: scale without its weight {name[: -len(suffix)]}; "
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
    # Offsets relative to the data area first (they go into the JSON), made absolute below.
    relative, offset = [], 0
    for t in header.tensors:
        r = resizes.get(t.name)
        shape = r.new_shape if r else t.shape
        length = tensor_nbytes(t.dtype, shape)
        relative.append(Piece(t, shape, offset, offset + length, r))
        offset += length
    metadata = output_metadata(header.metadata)
    # The JSON is joined from one small fragment per tensor rather than dumped from a dict of
    # dicts, which for a large header would take several times its size in memory.
    dumps = json.dumps
    body = ('{"__metadata__":' + dumps(metadata, separators=(",", ":")) + "".join(
        f',{dumps(p.name)}:{{"dtype":{dumps(p.dtype)},"shape":[{",".join(map(str, p.shape))}],'
        f'"data_offsets":[{p.out_begin},{p.out_end}]}}' for p in relative) + "}").encode()
    pieces = relative
    header_len = _padded_header_len(len(body), pieces)
    if header_len > MAX_HEADER_BYTES:       # alignment padding is an optimisation, the limit is not
        header_len = -(-len(body) // 8) * 8
    if header_len > MAX_HEADER_BYTES:
        raise _fail(header.name, f"the converted header would be {header_len} bytes, above the "
                                 f"{MAX_HEADER_BYTES}-byte limit of the safetensors library (engines could "
                                 "not open the file); split this shard into smaller ones first")
    prefix = struct.pack("<Q", header_len) + body + b" " * (header_len - len(body))
    data_start = len(prefix)
    pieces = [Piece(p.tensor, p.shape, p.out_begin + data_start, p.out_end + data_start, p.resize)
              for p in relative]
    return ShardPlan(header.name, header.path, header.size, prefix, pieces, data_start + offset,
                     header.prefix, header.identity)


def output_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """An output shard's __metadata__: the input's, with `format: pt` added if it has none
    (transformers before 4.47.1 cannot load a shard without it).

    >>> output_metadata(None), output_metadata({"format": "np"})
    ({'format': 'pt'}, {'format': 'np'})
    """
    return {**(metadata or {}), "format": (metadata or {}).get("format", "pt")}


def invert_shard(forward: ShardPlan, original: ShardHeader) -> ShardPlan:
    """The plan that turns `forward`'s output back into the `original` file, byte for byte."""
    where = {t.name: t for t in original.tensors}
    pieces = sorted((Piece(TensorEntry(p.name, p.dtype, p.shape, p.out_begin, p.out_end), where[p.name].shape,
                           where[p.name].begin, where[p.name].end, p.resize and p.resize.reversed())
                     for p in forward.pieces), key=lambda p: p.out_begin)
    return ShardPlan(forward.name, original.path, forward.out_size, original.prefix, pieces, original.size,
                     forward.header)


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


# The keys a block resize changes in config.json (fp8; compressed-tensors weights and activations).
BLOCK_KEYS = ("weight_block_size", "block_structure", "group_size")
MAX_JSON_EDITS = 16                     # occurrences tried in every combination: 2^16 parses at most


def edit_json_text(text: str, key: str, value: object, expected: object) -> str:
    """Replace the value of `key` in JSON `text` in place, keeping every other character.

    Falls back to re-serializing only if no replacement of its occurrences gives `expected`.

    >>> edit_json_text('{"a": {"b": [128, 128]}}', "b", [64, 64], {"a": {"b": [64, 64]}})
    '{"a": {"b": [64, 64]}}'
    """
    return edit_json_values(text, (key,), expected)


def edit_json_values(text: str, keys: tuple[str, ...], expected: object) -> str:
    """Turn JSON `text` into the `expected` document by replacing values of `keys` (numbers or
    flat lists of numbers) where they occur, keeping every other character: each occurrence may
    sit at another path (top level, text_config, each config group), so the combination of
    occurrences whose replacement gives `expected` is searched. Falls back to re-serializing.

    >>> edit_json_values('{"a": {"b": [128,128]}, "c": {"b": [128,128], "g": 128}}', ("b", "g"),
    ...                  {"a": {"b": [64, 64]}, "c": {"b": [64, 64], "g": 64}})
    '{"a": {"b": [64,64]}, "c": {"b": [64,64], "g": 64}}'
    """
    if json.loads(text) == expected:
        return text
    pattern = re.compile(r'"(%s)"(\s*:\s*)(\[[^\[\]]*\]|-?\d+)' % "|".join(re.escape(k) for k in keys))
    edits = []
    for m in pattern.finditer(text):
        new_value = _value_at_same_place(m, expected)
        if new_value is not None:
            edits.append((m.start(3), m.end(3), new_value))
    if len(edits) <= MAX_JSON_EDITS:
        for count in range(1, len(edits) + 1):
            for chosen in itertools.combinations(edits, count):
                candidate = text
                for start, end, new in sorted(chosen, reverse=True):
                    candidate = candidate[:start] + new + candidate[end:]
                try:
                    if json.loads(candidate) == expected:
                        return candidate
                except ValueError:
                    pass
    return json.dumps(expected, indent=2) + "\n"


def _value_at_same_place(m: re.Match, expected: object) -> str | None:
    """The replacement text for one `"key": value` match: the first value of that key in
    `expected` that differs from the old one, with the old list's spacing kept; None if every
    value of the key in `expected` equals the old one."""
    old_text = m.group(3)
    try:
        old = json.loads(old_text)
    except ValueError:
        return None
    for value in _values_of(expected, m.group(1)):
        if value == old or type(value) is not type(old) or (isinstance(value, list) and len(value) != len(old)):
            continue
        if isinstance(value, list):
            numbers = iter(value)
            return re.sub(r"-?\d+", lambda _: str(next(numbers)), old_text, count=len(value))
        return json.dumps(value)
    return None


def _values_of(doc: object, key: str) -> list[object]:
    """Every value stored under `key` anywhere in a JSON document."""
    found, todo = [], [doc]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            found += [v for k, v in node.items() if k == key]
            todo += node.values()
        elif isinstance(node, list):
            todo += node
    return found



# Top-level folders that are not part of the model, by exact name: our own state (only present
# mid --in-place, and the record a --restore is removing) and git's object store (a second full
# copy of the weights under git-lfs). Anything else, e.g. `.resize_block_size_notes`, is copied.
EXCLUDED_DIRS = {STATE_DIR, STATE_DIR + ".removing", ".git"}


@dataclass(frozen=True)
class LinkedFolder:
    """A symlinked subfolder of the input that the walk followed."""
    relpath: str
    target: str                     # the real path it leads to


def _ancestor_ids(real: str) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of `real` (a path without symlinks, which need not exist) and of every
    existing folder above it: identities that a bind mount or other alias cannot disguise."""
    ids = []
    for folder in (Path(real), *Path(real).parents):
        try:
            st = os.stat(folder)
        except OSError:
            continue
        ids.append((st.st_dev, st.st_ino))
    return ids


def walk_input(input_dir: Path, skip: set[str]) -> tuple[list[OtherFile], list[LinkedFolder]]:
    """Every file below `input_dir` except `skip` (top-level names), and the symlinked subfolders
    followed on the way (a Hugging Face cache snapshot is a tree of links into ../../blobs).

    Iterative (any depth), in os.walk's top-down order. Nothing is skipped silently: a folder
    that cannot be listed, a broken link, a FIFO or an unreadable file is an error, and every file
    is opened and its first byte read, so a file the run would fail to copy fails validation. A
    subfolder leading back to one of its own ancestors (a symlink or bind-mount loop) is refused.
    """
    files: list[OtherFile] = []
    links: list[LinkedFolder] = []
    top = os.stat(input_dir)
    # (folder path, path relative to INPUT, identities of the folder and every folder above it)
    stack = [(input_dir, "", (*_ancestor_ids(os.path.realpath(input_dir)), (top.st_dev, top.st_ino)))]
    while stack:
        folder, rel_folder, above = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise _fail(folder, f"cannot list this folder: {e.strerror or e}; fix its permissions "
                                "(nothing in the input may be skipped)")
        subfolders = []
        for entry in entries:
            rel = f"{rel_folder}{entry.name}"
            if not rel_folder and entry.name in skip:
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
                st = os.stat(path)
            except OSError as e:
                what = "is a broken symlink" if entry.is_symlink() else "cannot be read"
                raise _fail(path, f"{what} ({e.strerror or e}); fix the download")
            if not is_dir and not stat.S_ISREG(st.st_mode):
                raise _fail(path, "is not a regular file (a fifo, socket or device); remove it from the "
                                  "model folder or replace it with the real file")
            if is_dir:
                if not rel_folder and entry.name in EXCLUDED_DIRS:
                    continue
                if (st.st_dev, st.st_ino) in above:
                    raise _fail(path, "leads back into a folder that contains it (a symlink or mount loop); "
                                      "remove the link from the model folder")
                if entry.is_symlink():
                    links.append(LinkedFolder(rel, os.path.realpath(path)))
                subfolders.append((path, rel + "/", (*above, (st.st_dev, st.st_ino))))
                continue
            fd = open_regular(path)
            try:
                os.read(fd, 1)          # readable, not only listed: else the copy fails mid-run
            except OSError as e:
                raise _fail(path, f"cannot read: {e.strerror or e}; fix its permissions or the download")
            finally:
                os.close(fd)
            files.append(OtherFile(rel, path, st.st_size, FileIdentity.of(st)))
        stack.extend(reversed(subfolders))
    return files, links


def list_other_files(input_dir: Path, skip: set[str]) -> list[OtherFile]:
    """Every file below the folder except the converted ones (see `walk_input`)."""
    return walk_input(input_dir, skip)[0]


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
    quant: QuantFormat | None = None    # None: DeepSeek-style fp8 at the top level (older records)

    linked_dirs: list[LinkedFolder] = field(default_factory=list)   # symlinked subfolders followed

    @property
    def format(self) -> QuantFormat:
        return self.quant or QuantFormat("fp8", self.source_block, ((),))


def read_checkpoint(folder: Path) -> Checkpoint:
    """Validate a checkpoint folder from its metadata alone: config, index, every shard header,
    every weight/scale pair. Raises ConversionError naming the file (and tensor) at fault."""
    if not folder.exists():
        raise _fail(folder, "does not exist")
    if not folder.is_dir():
        raise _fail(folder, "is not a folder; give the model folder that holds config.json")
    config_path = folder / CONFIG_NAME
    if not os.path.lexists(config_path):
        raise _fail(folder, "has no config.json; give the Hugging Face model folder (the one with config.json "
                            "and the .safetensors shards)")
    config_text, config = _read_json_file(config_path, CONFIG_NAME)
    quant = read_quant_format(config, config_path)
    source = quant.block
    names, index_text, index = find_shards(folder)
    headers = [read_shard_header(folder / n, n) for n in names]
    if index is not None:
        held = {h.name: {t.name for t in h.tensors} for h in headers}
        for tensor, shard in index["weight_map"].items():
            if tensor not in held.get(shard, ()):
                raise _fail(INDEX_NAME, f"{tensor}: the index puts it in {shard}, which does not hold it; "
                                        "the index does not match the shards")
    pairs, fp8 = pair_scales(headers, source, quant.scale_suffix)
    skip = set(names) | {CONFIG_NAME} | ({INDEX_NAME} if index is not None else set())
    others, linked = walk_input(folder, skip)
    return Checkpoint(folder, config_text, config, source, headers, index_text, index, pairs, fp8,
                      others, quant=quant, linked_dirs=linked)


def make_plan(ckpt: Checkpoint, output_dir: Path, target: tuple[int, int]) -> Plan:
    """Decide every byte of the output for `target` blocks."""
    source = ckpt.source_block
    check_target_block(source, target)
    resizes = {name: ScaleResize(p.weight.shape, p.scale.shape,
                                 scale_shape(p.weight.shape, target), source, target)
               for name, p in ckpt.pairs.items()}
    shards = [plan_shard(h, resizes) for h in ckpt.headers]

    new_config = new_block_config(json.loads(ckpt.config_text), ckpt.format, target)
    config_text = edit_json_values(ckpt.config_text, BLOCK_KEYS, new_config)
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
        digest.update(os.fsencode(f"{f.relpath}:{f.size}"))    # the name's bytes, UTF-8 or not
    return Plan(ckpt.folder, output_dir, source, target, shards, config_text, index_text, ckpt.others,
                ckpt.fp8_weights, digest.hexdigest(), ckpt.format.locations)


# ---------------------------------------------------------------------------------------------
# Tensor-parallel advisor: which block each TP degree needs, from names and shapes alone
# ---------------------------------------------------------------------------------------------

TP_SIZES = (1, 2, 4, 8, 16, 32, 64)
BLOCK_EDGES = (128, 64, 32, 16)
# How SGLang and vLLM shard each projection (by the module name before `.weight`), read from their
# model files: DeepSeek-V2/V3 and GLM-5 (deepseek_v2.py, glm4_moe.py), Qwen3 / Qwen3-Next /
# Qwen3.5-3.6 (qwen3_moe.py, qwen3_next.py, qwen3_5.py, gdn_linear_attn.py), MiniMax-M2, Step-3.5.
COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_b_proj", "kv_b_proj",
                   "gate_proj", "up_proj", "w1", "w3",
                   "in_proj_z", "in_proj_a", "in_proj_b",   # Qwen3.5/3.6 gated delta net
                   "g_proj",                                # Step-3.5 head-wise attention gate
                   "linear_fc1"}                            # vision tower / merger MLP
ROW_PARALLEL = {"o_proj", "down_proj", "w2", "out_proj", "linear_fc2", "proj"}
REPLICATED = {"q_a_proj", "kv_a_proj_with_mqa", "fused_qkv_a_proj_with_mqa", "eh_proj", "gate",
              "shared_expert_gate",
              "wq_b", "wk", "weights_proj", "indexers_proj"}   # the DSA indexer (DeepSeek-V3.2, GLM-5)
KV_PROJ = {"k_proj", "v_proj"}                       # split over min(TP, KV heads)
# Merged column-parallel weights stored fused: each part is split over the ranks separately
# (MergedColumnParallelLinear), so each part's rows per rank must be a multiple of the block.
MERGED_PARTS = {
    "gate_up_proj": lambda d, rows: (rows // 2, rows // 2),
    "in_proj_qkv": lambda d, rows: d.key_dim and (d.key_dim, d.key_dim, d.value_dim),        # Qwen3.5/3.6
    "in_proj_qkvz": lambda d, rows: d.key_dim and (d.key_dim, d.key_dim, d.value_dim, d.value_dim),  # Qwen3-Next
    "in_proj_ba": lambda d, rows: (rows // 2, rows // 2),
    "qkv": lambda d, rows: (rows // 3,) * 3,                                                # vision attention
}


@dataclass(frozen=True)
class ModelDims:
    """The config dims the split rules need (from text_config for multimodal checkpoints)."""
    kv_heads: int | None = None
    key_dim: int | None = None      # linear attention: key heads x key head dim
    value_dim: int | None = None    # linear attention: value heads x value head dim


def _positive(c: dict, key: str) -> int | None:
    v = c.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def model_dims(config: dict) -> ModelDims:
    """ModelDims of a config.json, looking in text_config first (multimodal wrappers).

    >>> model_dims({"text_config": {"num_key_value_heads": 2, "linear_num_key_heads": 16,
    ...     "linear_key_head_dim": 128, "linear_num_value_heads": 32, "linear_value_head_dim": 128}})
    ModelDims(kv_heads=2, key_dim=2048, value_dim=4096)
    """
    texts = [c for c in (config.get("text_config"), config) if isinstance(c, dict)]

    def first(key: str) -> int | None:
        return next((v for c in texts if (v := _positive(c, key))), None)

    key_heads, key_dim = first("linear_num_key_heads"), first("linear_key_head_dim")
    value_heads, value_dim = first("linear_num_value_heads"), first("linear_value_head_dim")
    linear = key_heads and key_dim and value_heads and value_dim
    return ModelDims(_kv_heads(config), key_heads * key_dim if linear else None,
                     value_heads * value_dim if linear else None)


@dataclass(frozen=True)
class SplitRule:
    """Which dims of a weight tensor parallelism splits: rows (N), columns (K), both or none."""
    rows: bool
    cols: bool
    max_ways: int | None = None     # KV heads: the engines replicate them beyond this many ranks
    expert: bool = False            # a routed expert: not split under expert parallelism
    known: bool = True
    parts: tuple[int, ...] = ()     # a merged column-parallel weight: the rows of each part


def _is_routed_expert(name: str, leaf: str) -> bool:
    if ".experts." in name and ".shared_experts." not in name:
        return True
    # Step-3.5 stores its routed experts stacked, [E, N, K], as `moe.{gate,up,down}_proj`.
    return ".moe." in name and leaf in {"gate_proj", "up_proj", "down_proj"}


def split_rule(name: str, kv_heads: int | None = None, dims: ModelDims | None = None,
               shape: tuple[int, ...] = ()) -> SplitRule:
    """How tensor parallelism splits the weight `name` (of `shape`, needed for merged weights).

    >>> split_rule("model.layers.3.mlp.experts.7.down_proj.weight")
    SplitRule(rows=False, cols=True, max_ways=None, expert=True, known=True, parts=())
    >>> split_rule("model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
    ...            dims=ModelDims(2, 2048, 4096), shape=(8192, 2048)).parts
    (2048, 2048, 4096)
    """
    dims = dims or ModelDims(kv_heads)
    kv_heads = kv_heads or dims.kv_heads
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
    expert = _is_routed_expert(name, leaf)
    if leaf in MERGED_PARTS:
        rows = shape[-2] if len(shape) >= 2 else 0
        merged = MERGED_PARTS[leaf](dims, rows)
        if not merged or sum(merged) != rows:      # dims missing from config.json, or another layout
            return SplitRule(True, True, None, expert, known=False)
        return SplitRule(True, False, None, expert, parts=tuple(merged))
    if leaf in COLUMN_PARALLEL:
        return SplitRule(True, False, kv_heads if leaf in KV_PROJ else None, expert)
    if leaf in ROW_PARALLEL:
        return SplitRule(False, True, None, expert)
    if leaf in REPLICATED or (leaf == "fc" and name.startswith("mtp.")):   # Qwen3.5 MTP fc: nn.Linear
        return SplitRule(False, False, None, expert)
    return SplitRule(True, True, None, expert, known=False)


def split_failure(shape: tuple[int, ...], rule: SplitRule, tp: int, ep: bool,
                  block: tuple[int, int]) -> str | None:
    """Why `block` cannot serve this weight at `tp` ranks, or None if it can.

    >>> split_failure((18432, 7168), SplitRule(True, False), 32, False, (128, 128))
    '576 rows per rank are not a multiple of 128'
    >>> split_failure((18432, 7168), SplitRule(True, False), 32, False, (64, 64)) is None
    True
    >>> split_failure((8192, 2048), SplitRule(True, False, parts=(2048, 2048, 4096)), 64, False, (64, 64))
    'part 1 of 3 (2048 rows): 32 rows per rank are not a multiple of 64'
    """
    if rule.expert and ep:
        return None
    ways = min(tp, rule.max_ways) if rule.max_ways else tp
    for split, size, edge, what in ((rule.rows, shape[-2], block[0], "rows"), (rule.cols, shape[-1], block[1], "columns")):
        if not split:
            continue
        for i, part in enumerate(rule.parts if what == "rows" and rule.parts else (size,)):
            label = f"part {i + 1} of {len(rule.parts)} ({part} rows): " if what == "rows" and rule.parts else ""
            if part % ways:
                return f"{label}{part} {what} do not split evenly over {ways} ranks"
            if (part // ways) % edge:
                return f"{label}{part // ways} {what} per rank are not a multiple of {edge}"
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
    dims = model_dims(ckpt.config)
    weights: dict[tuple[tuple[int, ...], SplitRule], str] = {}
    unknown: list[str] = []
    for pair in ckpt.pairs.values():
        rule = split_rule(pair.weight.name, dims=dims, shape=pair.weight.shape)
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
# src_length, dest_offset}). Python has no binding for it, so the ioctl is packed by hand.
FICLONERANGE = 0x4020940D
_KERNEL_REFUSES = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY,
                   errno.EPERM, errno.ETXTBSY}


def _source_changed(offset: int) -> ConversionError:
    return ConversionError(f"source file ended early at byte {offset}; was it changed during the run?")


def _changed(name: str, problem: str) -> ConversionError:
    return _fail(name, f"changed during the run ({problem}); re-run the same command")


def open_source(path: Path, name: str, size: int, prefix: bytes = b"",
                identity: FileIdentity | None = None) -> tuple[int, os.stat_result]:
    """Open a file to copy from and check that it is the one the plan was made from: the same
    file (device, inode, mtime) when that was recorded, the planned size, and the planned first
    bytes, read through this descriptor. The writer then reads only through this descriptor, so a
    file replaced at its path later (another run, a re-download) is never mixed in.

    Returns the descriptor and its stat at opening (see `check_source_unchanged`).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        problem = None
        if identity and (st.st_dev, st.st_ino) != (identity.dev, identity.ino):
            problem = "it was replaced by another file"
        elif st.st_size != size:
            problem = f"it now has {st.st_size} bytes, planned from {size}"
        elif identity and st.st_mtime_ns != identity.mtime_ns:
            problem = "it was modified"
        elif prefix and os.pread(fd, len(prefix), 0) != prefix:
            problem = "its header differs from the one planned from"
        if problem:
            raise _changed(name, problem)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def check_source_unchanged(fd: int, opened: os.stat_result, name: str) -> None:
    """After copying from `fd`: nothing wrote to the file meanwhile (size and mtime as when opened)."""
    st = os.fstat(fd)
    if (st.st_size, st.st_mtime_ns) != (opened.st_size, opened.st_mtime_ns):
        raise _changed(name, "it was modified while being copied")


def samples_equal(src_fd: int, out_fd: int, runs: list[CopyRun], sample: int = 65536) -> bool:
    """True if the first and last `sample` bytes of every copied run are the same in the output as
    in the source: catches a run copied from the wrong place or not at all, at a few reads per run."""
    for r in runs:
        n = min(sample, r.length)
        for offset in (0, r.length - n):
            if os.pread(src_fd, n, r.src + offset) != os.pread(out_fd, n, r.dst + offset):
                return False
    return True


def set_direct(fd: int, on: bool) -> None:
    """Turn O_DIRECT on or off for an open file (Linux allows it with F_SETFL)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))


def clone_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    """Share `length` bytes of src with dst (XFS, btrfs); offsets and length block-aligned."""
    fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("qQQQ", src_fd, src_off, length, dst_off))


class CopyMethod(str, enum.Enum):
    """How unchanged bytes reach the output (a str, so it prints and compares as its name):

    - REFLINK: share whole aligned blocks with the source (XFS, btrfs, FICLONERANGE); what cannot
      be shared is written with O_DIRECT like DIRECT where the filesystem takes it, else in-kernel;
    - DIRECT: O_DIRECT writes from the source's page cache (see `ByteCopier._direct`); never shares;
    - COPY_FILE_RANGE: in-kernel copy (it may share blocks where the filesystem can);
    - BUFFERED: read/write through one buffer; the kernel cannot refuse it.
    """
    REFLINK = "reflink"
    DIRECT = "direct"
    COPY_FILE_RANGE = "copy_file_range"
    BUFFERED = "buffered"

    def after_refusals(self, refused: set[CopyMethod] | frozenset[CopyMethod]) -> CopyMethod:
        """The one fallback rule: a method whose kernel call was refused gives way to the next
        that writes the same bytes (reflink -> copy_file_range -> buffered; direct -> buffered,
        which never shares either).

        >>> CopyMethod.REFLINK.after_refusals({CopyMethod.REFLINK, CopyMethod.COPY_FILE_RANGE}).value
        'buffered'
        """
        method = self
        while method in refused:
            method = CopyMethod.BUFFERED if method is not CopyMethod.REFLINK else CopyMethod.COPY_FILE_RANGE
        return method


class ByteCopier:
    """Copies byte ranges between files with the `chosen` method, or the one the fallback rule
    gives once the kernel has refused a call (`CopyMethod.after_refusals`); the bytes written are
    the same. A refusal is a fact about the filesystems, learnt once for the whole run: workers
    add it to `refused` under a lock, and every copy step reads the method it implies once, so
    the chosen method itself never changes.
    """

    def __init__(self, chosen: CopyMethod | str, on_bytes: Callable[[int], None] = lambda n: None,
                 stop: threading.Event | None = None):
        self.chosen = CopyMethod(chosen)
        self.refused: frozenset[CopyMethod] = frozenset()
        self.on_bytes = on_bytes
        self.stop = stop or threading.Event()
        self.shared = 0
        self.copied = 0
        self.written = 0            # headers and scales, counted by `wrote`
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def method(self) -> CopyMethod:
        """The method copies use now: the chosen one, after the refusals seen so far."""
        return self.chosen.after_refusals(self.refused)

    def _refuse(self, method: CopyMethod) -> None:
        with self._lock:
            self.refused = self.refused | {method}

    def copy(self, src_fd: int, dst_fd: int, run: CopyRun) -> None:
        method = self.method
        head, shared = _aligned_span(run) if method is CopyMethod.REFLINK else (0, 0)
        if not shared and method in (CopyMethod.REFLINK, CopyMethod.DIRECT):
            self._copy_direct(src_fd, dst_fd, run, method)
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
                    self._refuse(CopyMethod.REFLINK)
                    break
                done += n
                self._count(n, shared=True)
            rest = head + done
            self._copy(src_fd, dst_fd, run.src + rest, run.dst + rest, run.length - rest)
        else:
            self._copy(src_fd, dst_fd, run.src, run.dst, run.length, buffered=method is CopyMethod.BUFFERED)

    def _copy_direct(self, src_fd: int, dst_fd: int, run: CopyRun, method: CopyMethod) -> None:
        # O_DIRECT needs the output offset and length in whole blocks: the unaligned ends (under
        # one block each) are copied otherwise, by the buffered loop for DIRECT (it never shares).
        buffered = method is CopyMethod.DIRECT
        head = min(run.length, -run.dst % ALIGN)
        body = (run.length - head) // ALIGN * ALIGN
        self._copy(src_fd, dst_fd, run.src, run.dst, head, buffered)
        use_direct = body and CopyMethod.DIRECT not in self.refused
        done = head + (self._direct(src_fd, dst_fd, run.src + head, run.dst + head, body) if use_direct else 0)
        self._copy(src_fd, dst_fd, run.src + done, run.dst + done, run.length - done, buffered)

    def _direct(self, src_fd: int, dst_fd: int, src: int, dst: int, length: int) -> int:
        """Write `length` bytes (dst and length block-aligned) with O_DIRECT; returns how many were
        written, fewer only if the kernel refused O_DIRECT (then it is not tried again).

        Why by hand: with copy_file_range on ext4 every byte is copied into the output's page
        cache and then written back, and the fsync that makes a shard safe to rename waits for
        that writeback, so on one worker copying and writeback never overlap. An O_DIRECT write
        goes from the buffer to the disk and leaves no writeback. When source and output offsets
        agree modulo the page size the buffer is the source's own page cache (a read-only mmap
        window), so no byte is copied by the CPU at all; otherwise the aligned scratch buffer
        bounces the bytes. bench/RESULTS.md has the figures.
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
            self._refuse(CopyMethod.DIRECT)
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

    def _scratch(self) -> mmap.mmap:
        """This worker's one scratch buffer, page-aligned as O_DIRECT needs; the buffered loop
        uses its first BUFFER_BYTES. Anonymous memory: pages count only once touched."""
        if not hasattr(self._local, "scratch"):
            self._local.scratch = mmap.mmap(-1, DIRECT_CHUNK)
        return self._local.scratch

    def _direct_through_buffer(self, src_fd: int, dst_fd: int, src: int, dst: int, n: int) -> None:
        with memoryview(self._scratch()) as whole, whole[:n] as part:
            if os.preadv(src_fd, [part], src) != n:
                raise _source_changed(src)
            _pwrite_all(dst_fd, part, dst)

    def _copy(self, src_fd: int, dst_fd: int, src: int, dst: int, length: int, buffered: bool = False) -> None:
        """In-kernel copy unless `buffered` or the kernel refused copy_file_range: then the
        buffered loop."""
        end = src + length
        while src < end:
            self._check_stop()
            n = min(COPY_CHUNK, end - src)
            if not buffered and CopyMethod.COPY_FILE_RANGE not in self.refused:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, n, src, dst)
                except OSError as e:
                    if e.errno not in _KERNEL_REFUSES:
                        raise
                    self._refuse(CopyMethod.COPY_FILE_RANGE)
                    continue
            else:
                n = self._buffered(src_fd, dst_fd, src, dst, n)
            if n == 0:
                raise _source_changed(src)
            src, dst = src + n, dst + n
            self._count(n, shared=False)

    def _buffered(self, src_fd: int, dst_fd: int, src: int, dst: int, length: int) -> int:
        with memoryview(self._scratch()) as whole, whole[: min(length, BUFFER_BYTES)] as view:
            got = os.preadv(src_fd, [view], src)
            _pwrite_all(dst_fd, view[:got], dst)
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


def choose_copy_method(requested: str, source: Path | None, probe_dir: Path) -> CopyMethod:
    """"auto" is REFLINK where a probe clone from `source` into `probe_dir` works, else DIRECT
    where an O_DIRECT write into `probe_dir` works, else COPY_FILE_RANGE (which itself falls
    back to BUFFERED if the kernel refuses). "no-share" (--no-reflink) must write real copies:
    DIRECT never shares; without it, where cloning works copy_file_range would share aligned
    ranges too, so it is BUFFERED there. Any other value names a method."""
    if requested not in ("auto", "no-share"):
        return CopyMethod(requested)
    can_share = source is not None and probe_reflink(source, probe_dir)
    if requested == "auto" and can_share:
        return CopyMethod.REFLINK
    if probe_direct(probe_dir):
        return CopyMethod.DIRECT
    return CopyMethod.BUFFERED if can_share else CopyMethod.COPY_FILE_RANGE


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
        if isinstance(e, (KeyboardInterrupt, Interrupted)):
            # Unlinking a big file can take seconds (a disk mounted with `discard`); Ctrl-C is
            # answered first. Not a daemon thread: Python waits for it before exiting, so the
            # partial is gone when the process is; if it is killed meanwhile, the re-run removes it.
            threading.Thread(target=_unlink_quietly, args=(tmp,), name="remove-partial").start()
        else:
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
    """Stream one shard: header, resized scales, and every other byte copied from the source,
    all read through one descriptor checked against the plan (`open_source`)."""
    src_fd, opened = open_source(shard.source, shard.name, shard.source_size, shard.source_prefix,
                                 shard.source_identity)
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
            self_check(shard, src_fd, fd, scales)
            check_source_unchanged(src_fd, opened, shard.name)
        write_atomic(output_dir / shard.name, fill, _permissions(src_fd), sync_dir=False)
    finally:
        os.close(src_fd)


def self_check(shard: ShardPlan, src_fd: int, out_fd: int, scales: dict[str, bytes]) -> None:
    """Re-read what was just written: the size, the header and every resized scale (a few MB per
    shard) against the bytes meant to be there, and both ends of every copied run against the
    source descriptor they were copied from."""
    size = os.fstat(out_fd).st_size
    if size != shard.out_size:
        raise ConversionError(f"{shard.name}: wrote {size} bytes, planned {shard.out_size}; not renamed into place")
    if os.pread(out_fd, len(shard.header), 0) != shard.header:
        raise ConversionError(f"{shard.name}: header read back differs from the one written")
    for p in shard.scales:
        if os.pread(out_fd, p.out_end - p.out_begin, p.out_begin) != scales[p.name]:
            raise ConversionError(f"{shard.name}: {p.name}: scale read back differs from the one written")
    if not samples_equal(src_fd, out_fd, shard.copy_runs()):
        raise ConversionError(f"{shard.name}: copied bytes read back differ from the source; not renamed into place")


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
    """Copy a file that is not converted, through a descriptor checked like a shard's."""
    final = output_dir / item.relpath
    _make_dirs(output_dir, Path(item.relpath).parent)
    src_fd, opened = open_source(item.source, item.relpath, item.size, identity=item.identity)
    whole = [CopyRun(0, 0, item.size)] if item.size else []

    def fill(fd: int) -> None:
        for run in whole:
            copier.copy(src_fd, fd, run)
        if not samples_equal(src_fd, fd, whole):
            raise ConversionError(f"{item.relpath}: bytes read back differ from the source; not renamed into place")
        check_source_unchanged(src_fd, opened, item.relpath)
    try:
        write_atomic(final, fill, _permissions(src_fd), sync_dir=False)
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


def _identity(path: Path | str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_output_location(input_dir: Path, output_dir: Path, linked_dirs: list[LinkedFolder] = ()) -> None:
    """Refuse an output that is, contains, or lies inside the input, in any spelling, and one that a
    symlinked subfolder of the input leads into (a re-run would read the half-written output).

    Decided by identity (st_dev, st_ino) of OUTPUT and its existing ancestors, creating nothing:
    a bind mount or any other alias of INPUT that realpath cannot see through is still INPUT.
    """
    src_real, dst_real = os.path.realpath(input_dir), os.path.realpath(output_dir)
    src, dst = _identity(input_dir), _identity(output_dir)
    dst_and_above = _ancestor_ids(dst_real)
    if src_real == dst_real or (dst is not None and dst == src):
        raise _fail(output_dir, "is the input folder; the input is never modified, choose another -o")
    if src in dst_and_above:
        raise _fail(output_dir, f"is inside the input folder {input_dir}; choose a folder outside it")
    if dst is not None and dst in _ancestor_ids(src_real):
        raise _fail(output_dir, f"contains the input folder {input_dir}; choose a new or empty folder")
    for link in linked_dirs:
        target = _identity(link.target)
        if target in dst_and_above or (dst is not None and dst in _ancestor_ids(link.target)):
            raise _fail(input_dir / link.relpath, f"is a symlink to {link.target}, which is, holds or lies inside "
                                                  f"the output folder {output_dir}; remove the link or choose "
                                                  "another -o")


def inspect_output(plan: Plan, force: bool = False) -> OutputState:
    """Classify OUTPUT: new/empty, an unfinished run of this conversion, or already complete.

    A finished output of this conversion that no longer matches the plan (damaged, edited) is
    rewritten with `force` ("resume" with nothing kept) and refused without it. Anything else that
    is not empty belongs to someone else and is refused untouched.
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
    if written_by_us(plan):
        if force:
            return OutputState("resume")
        raise _fail(out, "holds this conversion of this input, but it does not match the plan (damaged or "
                         "edited; --verify lists what differs); add --force to rewrite it")
    raise _fail(out, "exists and is not empty; choose a new or empty folder with -o (nothing was written)")


def written_by_us(plan: Plan) -> bool:
    """OUTPUT looks like this tool's output of this very conversion, whatever state its shards are
    in: its config.json is the planned one, every name at its top is one the plan writes, and at
    least one shard holds this input's bytes (another checkpoint of the same architecture has the
    same config and names). Only such a folder may be rewritten by --force; a foreign one never is."""
    out = plan.output_dir
    if not same_file_content(out / CONFIG_NAME, plan.config_text.encode()):
        return False
    planned = {CONFIG_NAME, STATE_DIR, *(s.name for s in plan.shards),
               *(f.relpath.split("/")[0] for f in plan.other_files)}
    if plan.index_text is not None:
        planned.add(INDEX_NAME)
    planned |= {_partial_path(out / name).name for name in list(planned)}
    if not all(p.name in planned for p in out.iterdir()):
        return False
    return any(os.path.isfile(out / s.name) and not os.path.islink(out / s.name)
               and shard_came_from_source(out / s.name, s) for s in plan.shards)


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
        return samples_equal(src.fileno(), out.fileno(), shard.copy_runs(), sample)


class FolderLock:
    """A flock on a folder's own descriptor: exclusive while a run writes OUTPUT (or converts or
    restores INPUT in place), shared while a conversion reads INPUT, so that no run reads a folder
    another one is rewriting. Locking the folder itself, not a file inside it, creates nothing in
    INPUT, leaves nothing in a finished OUTPUT, and stays held while a finishing run removes its
    state folder (a lock file inside that folder would vanish with it, letting a new run slip in).
    """

    def __init__(self, folder: Path, exclusive: bool):
        self.folder = folder
        self.exclusive = exclusive
        self.fd = -1

    def acquire(self, create: bool = False) -> None:
        """Take the lock without waiting; one line if another run holds it. With `create`, make
        the folder (and its parents) first."""
        for _ in range(10):
            if create:
                self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._flock(fd)
                # A run that was refused before writing removes the OUTPUT it created, under this
                # lock: what we locked must still be the folder at this path.
                st = os.fstat(fd)
                try:
                    now = os.stat(self.folder)
                except FileNotFoundError:
                    now = None
                if now is not None and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    self.fd, fd = fd, -1
                    return
            finally:
                if fd >= 0:
                    os.close(fd)
            if not create:
                break
        raise _fail(self.folder, "was removed or replaced while this run started; re-run the same command")

    def _flock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            doing = ("writing or reading this folder" if self.exclusive
                     else "converting this folder in place or restoring it")
            raise _fail(self.folder, f"another resize-block-size run is {doing}; "
                                     "wait for it to finish or stop it") from None
        except OSError as e:
            raise _fail(self.folder, f"cannot be locked against other runs ({e.strerror}); "
                                     "this filesystem does not support flock on folders") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# Running a conversion
# ---------------------------------------------------------------------------------------------

# What a run did, as opposed to how it copied bytes (Summary.method).
Outcome = Literal["converted", "converted in place", "already complete", "restored"]


@dataclass
class Summary:
    shards_written: int = 0
    shards_kept: int = 0
    scales: int = 0
    bytes_written: int = 0
    bytes_shared: int = 0
    seconds: float = 0.0
    method: str = ""                # the copy method that wrote the bytes ("" if none were)
    outcome: Outcome = "converted"


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


def check_progress_available(quiet: bool) -> None:
    """Before anything is written: the progress bar's library is there (a plain copy of the
    script may be run where tqdm is not installed). Found without importing it (see progress_bar)."""
    if not quiet and importlib.util.find_spec("tqdm") is None:
        raise ConversionError("tqdm, which draws the progress bar, is not installed: pip install tqdm, "
                              "or run with --quiet")


def progress_bar(total: int, desc: str, quiet: bool, delay: float = 0.5):
    """A byte counter on stderr (bytes, rate, time left) that tqdm shows only once the work has
    taken `delay` seconds; None with quiet. tqdm is imported here, not with the module, so quiet
    runs (scripts, the benchmark) never pay for its import."""
    if quiet:
        return None
    check_progress_available(quiet)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, dynamic_ncols=True,
                file=sys.stderr, delay=delay)


def prepare_writing(todo: list[ShardPlan], copy: str, probe_dir: Path, space_on: Path,
                    need: Callable[[bool], int], quiet: bool) -> CopyMethod:
    """What every mode that writes checks before its first write (a conversion, --in-place and
    --restore alike); returns the copy method. `need(reflink)`: the disk space the run takes."""
    check_scales_shrink(todo)
    method = choose_copy_method(copy, todo[0].source if todo else None, probe_dir)
    check_free_space(space_on, need(method is CopyMethod.REFLINK))
    return method


def convert(plan: Plan, *, force: bool = False, copy: str = "auto", workers: int = 1,
            quiet: bool = False) -> Summary:
    """Write `plan.output_dir`: shards, then other files, the index, and config.json last.

    The input is locked shared for the whole run (no --in-place or --restore can rewrite it
    meanwhile) and the output exclusively (one writer at a time)."""
    started = time.monotonic()
    check_progress_available(quiet)
    with FolderLock(plan.input_dir, exclusive=False):
        state = inspect_output(plan, force)
        if state.kind == "complete" and not force:
            return Summary(shards_kept=len(plan.shards), outcome="already complete")
        created = not plan.output_dir.exists()
        lock = FolderLock(plan.output_dir, exclusive=True)
        lock.acquire(create=True)
        try:
            state = inspect_output(plan, force)       # again, now that no other run can change it
            if state.kind == "complete" and not force:    # another run finished it meanwhile
                return Summary(shards_kept=len(plan.shards), outcome="already complete")
            if force:
                state = OutputState(state.kind)
            os.makedirs(plan.output_dir / STATE_DIR, exist_ok=True)
            todo = [s for s in plan.shards if s.name not in state.done_shards]
            method = prepare_writing(todo, copy, plan.output_dir / STATE_DIR, plan.output_dir,
                                     lambda reflink: bytes_to_write(plan, state, reflink), quiet)
            write_text(plan.output_dir / STATE_DIR / "run.json",
                       run_record(plan.source_block, plan.target_block, input=str(plan.input_dir.resolve()),
                                  fingerprint=plan.fingerprint))
            remove_partials(plan.output_dir, [s.name for s in plan.shards] + [f.relpath for f in plan.other_files])
            copier = write_files(plan.output_dir, todo, plan.other_files, method=method, workers=workers, quiet=quiet)
            if plan.index_text is not None:
                write_text(plan.output_dir / INDEX_NAME, plan.index_text)
            write_text(plan.output_dir / CONFIG_NAME, plan.config_text)
            # Still locked while the state folder goes: a run starting now is refused as busy,
            # it never finds the output half-finished without a state folder.
            shutil.rmtree(plan.output_dir / STATE_DIR)
            _fsync_dir(plan.output_dir)
        except BaseException as e:
            if isinstance(e, ConversionError) and not _has_output(plan.output_dir):
                # Refused before writing anything (e.g. not enough space): leave no trace.
                shutil.rmtree(plan.output_dir if created else plan.output_dir / STATE_DIR, ignore_errors=True)
            raise
        finally:
            lock.release()
    summary = summarize(todo, len(plan.shards), copier, "converted")
    summary.seconds = time.monotonic() - started
    return summary


def summarize(todo: list[ShardPlan], total: int, copier: ByteCopier, outcome: Outcome) -> Summary:
    """The Summary of a run that wrote `todo` of `total` shards (any mode)."""
    return Summary(shards_written=len(todo), shards_kept=total - len(todo),
                   scales=sum(len(s.scales) for s in todo), bytes_written=copier.total,
                   bytes_shared=copier.shared, method=copier.method.value, outcome=outcome)


def run_record(source_block: tuple[int, int], target_block: tuple[int, int], **fields: object) -> str:
    """The text of a run.json: an unfinished conversion's (in OUTPUT, `input` and `fingerprint`)
    or an in-place conversion's record (in INPUT, `mode`, `shards`, `index`)."""
    run = {"tool": PROG, "version": __version__, "source_block": list(source_block),
           "target_block": list(target_block), **fields}
    return json.dumps(run, indent=2) + "\n"


def _has_output(output_dir: Path) -> bool:
    return any(p.name != STATE_DIR for p in output_dir.iterdir())


def remove_partials(out: Path, relpaths: list[str]) -> None:
    """Remove the `.NAME.partial` files a killed run left for any of these files, in subfolders
    too. Only ours by name, and never through a symlink planted in `out` (writing refuses those
    in one line later)."""
    for rel in relpaths:
        folder = out
        for part in Path(rel).parent.parts:
            folder = folder / part
            try:
                if not stat.S_ISDIR(os.lstat(folder).st_mode):
                    break
            except OSError:
                break
        else:
            _unlink_quietly(_partial_path(out / rel))


def write_files(out: Path, shards: list[ShardPlan], others: list[OtherFile] = (), *, method: CopyMethod,
                workers: int = 1, quiet: bool = False) -> ByteCopier:
    """Write shards and copy other files into `out`, with one progress bar over all their bytes."""
    total = sum(s.out_size for s in shards) + sum(f.size for f in others)
    bar = progress_bar(total, "converting", quiet)
    bar_lock = threading.Lock()

    def advance(n: int) -> None:
        with bar_lock:
            bar.update(n)

    stop = threading.Event()
    copier = ByteCopier(method, advance if bar is not None else (lambda n: None), stop)
    jobs: list[Callable[[], None]] = [(lambda s=s: write_shard(s, out, copier)) for s in shards]
    jobs += [(lambda f=f: copy_other_file(f, out, copier)) for f in others]
    try:
        run_jobs(jobs, workers, stop)
    finally:
        if bar is not None:
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
    # Imported here: it pulls in logging, which a one-worker copy-on-write run need not pay for.
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
# run.json is written last, so a state folder without it means a run was stopped while recording,
# before it replaced anything. Both modes hold an exclusive lock on INPUT (`FolderLock`) for as
# long as they touch the state folder or the shards.

def _state_path(folder: Path) -> Path:
    return folder / STATE_DIR


def save_in_place_state(ckpt: Checkpoint, target: tuple[int, int]) -> None:
    """Record the original headers, config and index, flushed, before anything is replaced."""
    state = _state_path(ckpt.folder)
    state.mkdir(exist_ok=True)
    _make_dirs(state, Path("original/headers"))
    for h in ckpt.headers:
        write_atomic(state / "original/headers" / h.name, lambda fd, h=h: _pwrite_all(fd, h.prefix, 0),
                     sync_dir=False)
    _fsync_dir(state / "original/headers")
    write_text(state / "original" / CONFIG_NAME, ckpt.config_text)
    if ckpt.index_text is not None:
        write_text(state / "original" / INDEX_NAME, ckpt.index_text)
    _fsync_dir(state)
    write_text(state / "run.json",                    # last: marks the record complete
               run_record(ckpt.source_block, target, mode="in-place",
                          shards={h.name: h.size for h in ckpt.headers}, index=ckpt.index_text is not None))


def _damaged(state: Path, problem: str) -> ConversionError:
    return _fail(state, f"the in-place record is damaged or incomplete ({problem}); it was kept and nothing "
                        "was changed: restore the shards from the original download")


def _block_problem(value: object) -> bool:
    return not (isinstance(value, list) and len(value) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in value))


def record_problem(run: object) -> str | None:
    """What is wrong with a parsed run.json of an in-place conversion, or None.

    >>> record_problem({"mode": "in-place", "source_block": [128, 128], "target_block": [64, 64],
    ...                 "shards": {"a.safetensors": 4096}})
    >>> record_problem({"mode": "in-place", "source_block": [128, 128], "target_block": [64, 64],
    ...                 "shards": {"../a.safetensors": 4096}})
    "shard name '../a.safetensors' is not a plain .safetensors file name"
    """
    if not isinstance(run, dict):
        return "run.json is not a JSON object"
    for key in ("source_block", "target_block"):
        if _block_problem(run.get(key)):
            return f"{key} is {json.dumps(run.get(key))}, expected two positive integers"
    shards = run.get("shards")
    if not isinstance(shards, dict) or not shards:
        return "shards is not a non-empty object of file names to sizes"
    for name, size in shards.items():
        if "/" in name or "\\" in name or not name.endswith(".safetensors") or name.startswith("."):
            return f"shard name {name!r} is not a plain .safetensors file name"
        if not isinstance(size, int) or isinstance(size, bool) or size < 8:
            return f"{name}: size {json.dumps(size)} is not a whole number of bytes"
    if not isinstance(run.get("index", False), bool):
        return "index is not true or false"
    return None


def load_in_place_state(folder: Path) -> tuple[Checkpoint, tuple[int, int]] | None:
    """The original checkpoint as recorded before an in-place conversion, and its target block;
    None if there is no record (no run.json: none was made, or the run was stopped while
    recording). A record that is damaged, incomplete or does not parse is refused in one line and
    left as it is."""
    state = _state_path(folder)
    run_path = state / "run.json"
    if not os.path.lexists(run_path):
        return None
    try:
        run = json.loads(run_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _damaged(state, f"run.json cannot be read as JSON: {getattr(e, 'strerror', None) or e}")
    if isinstance(run, dict) and run.get("mode") != "in-place":
        raise _fail(state, "is not an in-place conversion record of this tool; remove it or move it away")
    problem = record_problem(run)
    if problem:
        raise _damaged(state, problem)
    try:
        config_text = (state / "original" / CONFIG_NAME).read_text(encoding="utf-8")
        config = json.loads(config_text)
        quant = read_quant_format(config, state / "original" / CONFIG_NAME)
        source = quant.block
        if list(source) != run["source_block"]:
            raise _damaged(state, f"the saved config.json has {block_name(source)} blocks, run.json "
                                  f"{block_name(run['source_block'])}")
        check_target_block(source, tuple(run["target_block"]))
        headers = []
        for name, size in sorted(run["shards"].items()):
            prefix = (state / "original/headers" / name).read_bytes()
            headers.append(parse_shard_header(folder / name, name, size, prefix))
        index_path = state / "original" / INDEX_NAME
        if run.get("index", index_path.exists()) != index_path.exists():
            raise _damaged(state, f"original/{INDEX_NAME} is " + ("missing" if run.get("index") else "unexpected"))
        index_text = index_path.read_text(encoding="utf-8") if index_path.exists() else None
        index = json.loads(index_text) if index_text is not None else None
        pairs, fp8 = pair_scales(headers, source, quant.scale_suffix)
    except ConversionError as e:
        raise _damaged(state, str(e)) from None
    except (OSError, ValueError) as e:
        raise _damaged(state, f"{getattr(e, 'filename', None) or 'a saved file'}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
    ckpt = Checkpoint(folder, config_text, config, source, headers, index_text, index, pairs, fp8, [], quant=quant)
    return ckpt, tuple(run["target_block"])


def check_unrecorded_state(folder: Path) -> None:
    """A state folder without run.json is a run stopped while recording, which replaced nothing:
    every original header saved so far must still begin its shard, and a saved config.json must
    still be the folder's. Anything else is damage, refused in one line."""
    state = _state_path(folder)
    headers = state / "original/headers"
    for saved in sorted(headers.iterdir()) if headers.is_dir() else []:
        if saved.name.startswith("."):
            continue                                   # a .partial left by the stopped run
        prefix = saved.read_bytes()
        try:
            with open(folder / saved.name, "rb") as f:
                same = f.read(len(prefix)) == prefix
                # The saved header must also describe a file of the shard's size, as it did.
                parse_shard_header(folder / saved.name, saved.name, os.fstat(f.fileno()).st_size, prefix)
        except (OSError, ConversionError):
            same = False
        if not same:
            raise _damaged(state, f"no run.json, and {saved.name} is not the shard whose header was saved")
    config = state / "original" / CONFIG_NAME
    if config.is_file() and not same_file_content(folder / CONFIG_NAME, config.read_bytes()):
        raise _damaged(state, f"no run.json, and {CONFIG_NAME} differs from the saved one")


def in_place_extra_bytes(shards: list[ShardPlan], reflink: bool = False) -> int:
    """Peak extra disk of an in-place run: the largest new shard (less what copy-on-write shares)."""
    return max((s.out_size - (s.shareable_bytes() if reflink else 0) for s in shards), default=0)


def convert_in_place(ckpt: Checkpoint, target: tuple[int, int], *, recorded: bool, copy: str = "auto",
                     quiet: bool = False) -> Summary:
    """Convert `ckpt.folder` itself to `target` blocks, one shard at a time. `recorded`: the
    checkpoint comes from the state of an earlier, interrupted or finished, in-place run."""
    started = time.monotonic()
    check_progress_available(quiet)
    plan = make_plan(ckpt, ckpt.folder, target)
    check_scales_shrink(plan.shards)              # going back (e.g. 64 -> 128): refuse before recording
    with FolderLock(ckpt.folder, exclusive=True):
        # What the caller read before the lock may be stale: another run may have recorded,
        # converted or restored since. The shards themselves are checked when opened.
        if (load_in_place_state(ckpt.folder) is not None) != recorded:
            raise _fail(ckpt.folder, "was converted or restored in place by another run meanwhile; "
                                     "re-run the same command")
        if not recorded:
            if _state_path(ckpt.folder).exists():
                check_unrecorded_state(ckpt.folder)
            save_in_place_state(ckpt, target)
        summary = _replace_in_place(ckpt, plan, forward=True, copy=copy, quiet=quiet)
    summary.seconds = time.monotonic() - started
    return summary


def restore_in_place(folder: Path, *, copy: str = "auto", quiet: bool = False) -> Summary:
    """Give back the original files of a folder converted in place, byte for byte, and remove the
    state folder. Success only once every shard, config.json and the index were read back equal
    to the record."""
    started = time.monotonic()
    check_progress_available(quiet)
    trash = folder / (STATE_DIR + ".removing")
    if not folder.is_dir():
        raise _no_record(folder)
    with FolderLock(folder, exclusive=True):
        recorded = load_in_place_state(folder)
        if recorded is None:
            # Stopped while recording (nothing was replaced before run.json: checked here) or while
            # removing the record (everything was restored): either way the shards are the originals.
            if _state_path(folder).is_dir():
                check_unrecorded_state(folder)
            leftovers = [p for p in (_state_path(folder), trash) if p.is_dir()]
            if not leftovers:
                raise _no_record(folder)
            for p in leftovers:
                shutil.rmtree(p)
            _fsync_dir(folder)
            return Summary(outcome="restored")
        ckpt, target = recorded
        summary = _replace_in_place(ckpt, make_plan(ckpt, folder, target), forward=False, copy=copy, quiet=quiet)
        check_restored(ckpt)
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(_state_path(folder), trash)    # atomic: the record is gone as a whole or not at all
        shutil.rmtree(trash)
        _fsync_dir(folder)
    summary.seconds = time.monotonic() - started
    return summary


def _no_record(folder: Path) -> ConversionError:
    return _fail(folder, "has no record of an in-place conversion (none was made here, or a --restore "
                         "finished and removed it); to go back to the original blocks from a separate "
                         "output, convert it with --block-size 128 (the original block)")


def check_restored(ckpt: Checkpoint) -> None:
    """Before a restore says so: every shard has its recorded size and header, and config.json and
    the index are the recorded originals. The record is kept otherwise."""
    for h in ckpt.headers:
        if not file_starts_with(ckpt.folder / h.name, h.size, h.prefix):
            raise _fail(h.name, "is not the original after restoring (size or header differ from the record); "
                                "the record was kept")
    expected = [(CONFIG_NAME, ckpt.config_text)] + ([(INDEX_NAME, ckpt.index_text)] if ckpt.index_text else [])
    for name, text in expected:
        if not same_file_content(ckpt.folder / name, text.encode("utf-8")):
            raise _fail(ckpt.folder / name, "is not the original after restoring; the record was kept")


def shards_to_replace(ckpt: Checkpoint, plan: Plan, *, forward: bool) -> list[ShardPlan]:
    """The shard plans an in-place run (forward) or a restore still has to write, reading only
    sizes and headers. Every shard must be the original or its converted version; anything else
    is refused, since neither direction could then give back exact files."""
    todo = []
    for shard, original in zip(plan.shards, ckpt.headers):
        path = ckpt.folder / shard.name
        converted = shard_is_complete(path, shard)
        if converted if forward else file_starts_with(path, original.size, original.prefix):
            continue
        if forward and not file_starts_with(path, original.size, original.prefix):
            raise _fail(shard.name, "is neither the original shard nor its converted version; restore it from "
                                    "the download before converting in place")
        if not forward and not converted:
            raise _fail(shard.name, "is neither the converted shard nor the original; it was changed after the "
                                    "in-place conversion, cannot restore it exactly")
        todo.append(shard if forward else invert_shard(shard, original))
    return todo


def _replace_in_place(ckpt: Checkpoint, plan: Plan, *, forward: bool, copy: str, quiet: bool) -> Summary:
    """Replace shards one at a time (each written beside the old one, then renamed over it), then
    the index, then config.json: to `plan`'s converted files (forward) or back to the recorded
    originals. Every shard must be one of the two versions; those already as wanted are kept."""
    folder = ckpt.folder
    todo = shards_to_replace(ckpt, plan, forward=forward)
    index_text, config_text = (plan.index_text, plan.config_text) if forward else (ckpt.index_text, ckpt.config_text)
    method = prepare_writing(todo, copy, _state_path(folder), folder,
                             lambda reflink: in_place_extra_bytes(todo, reflink), quiet)
    remove_partials(folder, [s.name for s in plan.shards])
    copier = write_files(folder, todo, method=method, quiet=quiet)
    if index_text is not None:
        write_text(folder / INDEX_NAME, index_text)
    write_text(folder / CONFIG_NAME, config_text)
    return summarize(todo, len(plan.shards), copier, "converted in place" if forward else "restored")


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
    reader: str = ""                # what read the output's headers back, for the summary line


def safetensors_reader() -> tuple[Callable, str]:
    """`safetensors.safe_open` and the library's version, or a one-line refusal.

    --verify reads every output header with the library the engines use, so a bug shared by our
    writer and our own header parser cannot pass it. Imported here: the converter never needs it.
    """
    try:
        import numpy  # noqa: F401  (safe_open needs a framework; numpy is the light one)
        import safetensors
        from safetensors import safe_open
    except ImportError as e:
        raise ConversionError(f"--verify reads the output back with the safetensors library, which cannot be "
                              f"imported ({e}); run `pip install safetensors numpy` (or reinstall "
                              "resize-block-size)")
    if not hasattr(safe_open, "offset_keys"):
        raise ConversionError(f"--verify needs safe_open.offset_keys, which safetensors {safetensors.__version__} "
                              "lacks; run `pip install -U safetensors`")
    return safe_open, f"safetensors {safetensors.__version__}"


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
    safe_open, reader = safetensors_reader()
    report = VerifyReport(reader=reader)
    out = plan.output_dir
    in_input = _verify_listing(plan, report)
    total = (sum(p.src_end - p.src_begin for s in plan.shards for p in s.pieces)
             + sum(f.size for f in plan.other_files))
    bar = progress_bar(total, "verifying", quiet)
    update = bar.update if bar is not None else (lambda n: None)
    try:
        for shard in plan.shards:
            _verify_shard(plan, shard, report, update, safe_open)
        for item in plan.other_files:
            if item.relpath in in_input:            # else already reported by the listing
                _verify_other_file(out, item, report, update)
    finally:
        if bar is not None:
            bar.close()
    _verify_json(out / CONFIG_NAME, plan.config_text, report,
                 "differs from the input's config.json with only its block settings changed (weight_block_size, "
                 "or compressed-tensors' block_structure and group_size)")
    block_problem = block_config_problem(out / CONFIG_NAME, plan.target_block, plan.quant_locations)
    if block_problem:
        report.problems.append(block_problem)
    if plan.index_text is not None:
        _verify_json(out / INDEX_NAME, plan.index_text, report,
                     "weight_map or total_size differ from the input's index and the real tensor sizes")
    if os.path.lexists(out / STATE_DIR):
        report.problems.append(f"{out}: an unfinished run's {STATE_DIR}/ is still there; re-run the conversion")
    return report


def _verify_listing(plan: Plan, report: VerifyReport) -> set[str]:
    """Compare a fresh, complete listing of the input (not the plan's) with the output's, at every
    depth; returns the input's files. Anything missing or extra is a problem."""
    listings = []
    for folder, what in ((plan.input_dir, "input"), (plan.output_dir, "output")):
        try:
            listings.append({f.relpath for f in walk_input(folder, set())[0]})
        except ConversionError as e:
            report.problems.append(f"cannot list the {what} completely: {e}")
            listings.append(set())
    in_input, in_output = listings
    for rel in sorted(in_input - in_output):
        report.problems.append(f"{rel}: in the input but missing from the output")
    for rel in sorted(in_output - in_input):
        report.problems.append(f"{rel}: in the output but not in the input")
    return in_input


def _library_layout(path: Path, safe_open: Callable) -> tuple[dict[str, str] | None, dict[str, TensorEntry]]:
    """A shard's __metadata__ and tensors as the safetensors library reads them. The library
    gives names, dtypes, shapes and the data order but no offsets; it also checks that the
    tensors tile the data area without gap or overlap, so the offsets follow from the order."""
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
        names = f.offset_keys()
        with open(path, "rb") as raw:
            (header_len,) = struct.unpack("<Q", raw.read(8))
        offset, tensors = 8 + header_len, {}
        for name in names:
            piece = f.get_slice(name)
            dtype, shape = piece.get_dtype(), tuple(piece.get_shape())
            end = offset + tensor_nbytes(dtype, shape)
            tensors[name] = TensorEntry(name, dtype, shape, offset, end)
            offset = end
    if offset != os.stat(path).st_size:
        raise ValueError(f"tensor data ends at byte {offset} but the file has {os.stat(path).st_size} bytes")
    return metadata, tensors


def _verify_shard(plan: Plan, shard: ShardPlan, report: VerifyReport, on_bytes: Callable[[int], None],
                  safe_open: Callable) -> None:
    path = plan.output_dir / shard.name
    if not path.is_file():
        report.problems.append(f"{shard.name}: missing from the output")
        return
    try:
        written_metadata, written = _library_layout(path, safe_open)
    except Exception as e:          # the library's SafetensorError, an unknown dtype, ...
        try:                        # our parser names the cause in the user's terms, if it sees one
            read_shard_header(path, shard.name)
            report.problems.append(f"{shard.name}: {report.reader} cannot read it: {e}")
        except ConversionError as ours:
            report.problems.append(f"{ours} ({report.reader}: {e})")
        return
    metadata = output_metadata(read_shard_header(shard.source, shard.name).metadata)
    if written_metadata != metadata:
        report.problems.append(f"{shard.name}: __metadata__ {written_metadata} differs from the input's {metadata}")
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
    """Per layer kind: loads on N/N ranks (and the ranks compared bit for bit), or the engine's error.
    Through _print_stdout, like every other answer: a reader that closed stdout is not an error."""
    mode = f"TP{report.tp}" + (" with EP" if report.ep else "")
    _print_stdout(f"engine check: {report.engine} {report.version}, {mode}, {report.what} "
          f"({block_name(report.block)} blocks, {report.architecture}): {report.folder}")
    if report.unsupported:
        _print_stdout(f"  NOT CHECKED: {report.unsupported}")
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
        _print_stdout(f"  {k.kind:<{width}}  {k.prefix}: {status} ({k.seconds:.1f} s)")
    if report.unchecked:
        _print_stdout(f"  NOT CHECKED (no {report.engine} layer built for them): {', '.join(report.unchecked[:5])}"
              + (f" and {len(report.unchecked) - 5} more" if len(report.unchecked) > 5 else ""))
    verdict = "every layer kind loads" if report.ok else "does NOT load as a whole"
    _print_stdout(f"  {report.what}: {verdict} at {mode} with {report.engine} {report.version}")


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


def run_engine_check(args: argparse.Namespace, ckpt: Checkpoint, plan: Plan | None, console: Console) -> int:
    """--engine: the reports go into the JSON result, or are printed."""
    reports = engine_reports(args, ckpt, plan)
    console.result["engine_check"] = [dataclasses.asdict(r) | {"ok": r.ok} for r in reports]
    return report_engine(reports, printed=console.as_json)


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
  resize-block-size deepseek-ai/DeepSeek-R1 --tp 32
      a model in the Hugging Face cache (never downloaded): writes ./DeepSeek-R1-Block64x64
  resize-block-size /models/DeepSeek-V3 --tp 32 --dry-run
      which block TP32 needs, the plan, the disk it takes and what OUTPUT already holds
  resize-block-size /models/DeepSeek-V3 --block-size 32 -o /data/DeepSeek-V3-b32 --verify
      32x32 blocks (TP64) into a folder of your choice, then compare every byte with the input
  resize-block-size /models/DeepSeek-V3 --in-place
      no room for a second copy: convert the folder itself (--restore undoes it exactly)

Re-run the same command after an interruption: finished shards are kept, the rest is written.

exit codes (every mode):
  0    done, or nothing to do (already converted; the blocks already load at --tp N)
  1    refused or failed: bad input, a foreign output folder, --verify found a difference
  2    usage: unknown option, malformed value, or options that do not go together
  130  interrupted (Ctrl-C, SIGTERM): finished shards are kept, re-run to resume
A reader that closes stdout early (`| head -1`) neither stops the run nor changes its exit code.
With --json, stdout is one JSON object in every mode, errors included ("ok", "exit_code",
"error"); the one-line error still goes to stderr.
"""


@dataclass(frozen=True)
class InputFolder:
    """The model folder INPUT names, and its repo id when it is a Hugging Face cache snapshot."""
    path: Path
    repo: str | None = None


# `org/name` or `org/name@revision`, as the Hub spells repo ids (and SGLang's --model-path).
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def cache_repo_of(folder: Path) -> str | None:
    """The repo id of a Hugging Face cache snapshot folder (`.../models--org--name/snapshots/<rev>`).

    >>> cache_repo_of(Path("/c/hub/models--deepseek-ai--DeepSeek-R1/snapshots/0123abc"))
    'deepseek-ai/DeepSeek-R1'
    >>> cache_repo_of(Path("/models/DeepSeek-R1")) is None
    True
    """
    folder = Path(os.path.abspath(folder))
    repo_dir = folder.parent.parent
    if folder.parent.name == "snapshots" and repo_dir.name.startswith("models--"):
        return repo_dir.name[len("models--"):].replace("--", "/")
    return None


def resolve_input(text: str) -> InputFolder:
    """INPUT as a folder: a model folder, a cache snapshot, a `models--org--name` cache folder, or
    a repo id looked up in the local Hugging Face cache (never downloaded)."""
    path = Path(text)
    if path.is_dir():
        if path.name.startswith("models--") and (path / "snapshots").is_dir():
            return snapshot_in_cache(path.name[len("models--"):].replace("--", "/"), None, path.parent)
        return InputFolder(path, cache_repo_of(path))
    if os.path.lexists(path) or not REPO_ID.fullmatch(text):
        return InputFolder(path)                  # read_checkpoint says what is wrong with it
    repo, _, revision = text.partition("@")
    return snapshot_in_cache(repo, revision or None, None)


def snapshot_in_cache(repo: str, revision: str | None, cache_dir: Path | None) -> InputFolder:
    """The cached snapshot of `repo`, found by huggingface_hub's own rules (HF_HUB_CACHE, HF_HOME,
    the default location, refs/ for branch names), offline."""
    # Offline before the import: huggingface_hub reads it into its constants then. local_files_only
    # alone already forbids any download; this also keeps it from asking the Hub for metadata.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    label = repo + (f"@{revision}" if revision else "")
    try:
        import huggingface_hub
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise _fail(label, "is not a folder, and huggingface_hub (needed to find it in the Hugging Face cache) "
                           "is not installed; pip install huggingface_hub, or give the model folder")
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        cache = cache_dir or constants.HF_HUB_CACHE
        # huggingface_hub 1.0 replaced the huggingface-cli command with hf.
        cli = "hf download" if int(huggingface_hub.__version__.split(".")[0]) >= 1 else "huggingface-cli download"
        download = f"{cli} {repo}" + (f" --revision {revision}" if revision else "")
        raise _fail(label, f"is not a folder and not in the Hugging Face cache {cache}; "
                           f"download it first ({download}) or give the model folder") from None
    return InputFolder(Path(folder), repo)


def default_output(source: InputFolder, target: tuple[int, int]) -> Path:
    """The sibling folder `INPUT-Block64x64`; for a model in the Hugging Face cache,
    `./NAME-Block64x64` in the current folder (files inside the cache belong to huggingface_hub).

    >>> default_output(InputFolder(Path("/m/DeepSeek-V3/")), (64, 64)).as_posix()
    '/m/DeepSeek-V3-Block64x64'
    """
    if source.repo:
        return Path.cwd() / f"{source.repo.split('/')[-1]}-Block{block_name(target)}"
    base = Path(os.path.abspath(source.path))
    return base.with_name(f"{base.name}-Block{block_name(target)}")


class _Parser(argparse.ArgumentParser):
    """argparse, but with --json a usage error is also one JSON object on stdout."""
    json_errors = False

    def error(self, message: str) -> None:
        if self.json_errors:
            _print_stdout(json.dumps({"ok": False, "exit_code": 2, "error": message}))
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Resize the quantization blocks of a block-FP8 checkpoint (DeepSeek-V3/R1, Kimi-K2, "
                    "Qwen3-FP8, MiniMax-M2, ...) by replicating its scales. Lossless: every weight "
                    "dequantizes to exactly the same value. The input folder is only read, except with "
                    "--in-place, which converts it (and --restore gives it back byte for byte).")
    p.add_argument("input", metavar="INPUT",
                   help="model folder with config.json and .safetensors shards, or a model in the Hugging "
                        "Face cache: org/name, org/name@revision, a models--org--name folder")
    p.add_argument("-o", "--output", metavar="OUTPUT",
                   help="output folder (default: INPUT-Block64x64 next to INPUT, named after the block; "
                        "./NAME-Block64x64 for a model in the Hugging Face cache)")
    p.add_argument("--block-size", metavar="B",
                   help="target block: 64, 64x64 or 64,128 (rows x cols); must divide the source block "
                        "(default: 64), or be a multiple of it to undo an earlier conversion")
    p.add_argument("--tp", type=int, metavar="N",
                   help="pick the largest block that tensor parallelism over N GPUs can load; "
                        "exits 0 without writing if the checkpoint already works at TP N")
    p.add_argument("--ep", action="store_true",
                   help="with --tp: experts are placed by expert parallelism, not split")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, the TP table and what OUTPUT already holds; write nothing")
    p.add_argument("--json", action="store_true",
                   help="print the result of any mode (plan, summary, verify report, error) as one JSON object")
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
                   help="rewrite every shard of OUTPUT, also a finished or damaged output of this same "
                        "conversion (never a folder this tool did not write for this input)")
    p.add_argument("--no-reflink", action="store_true",
                   help="always copy bytes, never share them with the input (XFS/btrfs copy-on-write)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="shards converted in parallel (default: 1; the disk is the limit)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar, no summary and no serving hint (errors, answers such as "
                        "'nothing to convert', the --dry-run plan, the --verify verdict and --json still print)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


class Console:
    """Where answers go: text lines on stdout as they come, or with --json one object at the end.

    Errors are always one line on stderr too. A closed stdout (`| head -1`) silences the rest
    instead of failing a run whose work is unaffected.
    """

    def __init__(self, as_json: bool = False, quiet: bool = False):
        self.as_json, self.quiet = as_json, quiet
        self.result: dict = {}

    def say(self, text: str, *, even_quiet: bool = False) -> None:
        """A line for people; none with --json, none with --quiet unless `even_quiet`."""
        if not self.as_json and (even_quiet or not self.quiet):
            _print_stdout(text)

    def error(self, message: str, code: int, prefix: str = "error: ") -> int:
        self.result.update(ok=False, exit_code=code, error=message)
        try:
            print(f"{PROG}: {prefix}{message}", file=sys.stderr)
        except BrokenPipeError:
            pass                # nobody reads stderr; the exit code still says it
        return code

    def finish(self, code: int) -> None:
        if self.as_json:
            result = {"ok": code == 0, "exit_code": code, **self.result}
            _print_stdout(json.dumps(result, indent=2, default=str))


def _print_stdout(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_closed()


def _stdout_closed() -> None:
    """The reader went away: send the rest of stdout, and Python's final flush, to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):       # no real file descriptor (io.UnsupportedOperation is both)
        pass


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch to one mode, and turn every failure into one line and an exit code."""
    parser = build_parser()
    parser.json_errors = "--json" in (sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    console = Console(args.json, args.quiet)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        code = run(args, console)
    except UsageError as e:
        code = console.error(str(e), 2)
    except ConversionError as e:
        code = console.error(str(e), 1)
    except (KeyboardInterrupt, Interrupted):
        code = console.error("interrupted; finished shards are kept, re-run the same command to resume",
                             130, prefix="")
    except OSError as e:      # a broken pipe here is stderr's (stdout's are absorbed), and it did stop the run
        code = console.error(_describe_os_error(e, console.result.get("default_output", False)), 1)
    console.finish(code)
    return code


def run(args: argparse.Namespace, console: Console) -> int:
    """The command: find INPUT, then one function per mode (restore, in place, dry run, verify,
    convert), each of which plans and then writes or reports."""
    check_flags(args)
    if args.engine:
        import_engine(args.engine)                # before anything is read or written
    source = resolve_input(args.input)
    console.result.update(input=str(source.path), repo=source.repo)
    if args.restore:
        return run_restore(args, source, console)
    if args.in_place:
        return run_in_place(args, source, console)
    # Shared from before the first header is read: an --in-place or --restore run (exclusive) can
    # neither start meanwhile nor be half-way through what this run plans from.
    with FolderLock(source.path, exclusive=False) if source.path.is_dir() else contextlib.nullcontext():
        return run_reading(args, source, console)


def run_reading(args: argparse.Namespace, source: InputFolder, console: Console) -> int:
    """The modes that only read INPUT: plan, then dry run, verify or convert."""
    refuse_unfinished_in_place(source.path)
    ckpt = read_checkpoint(source.path)
    advice = advise_tp(ckpt)
    target = pick_target(args, ckpt, advice, console)
    if target is None:
        return run_engine_check(args, ckpt, None, console) if args.engine else 0
    output_dir = Path(args.output) if args.output else default_output(source, target)
    console.result.update(output=str(output_dir), default_output=not args.output)
    check_output_location(source.path, output_dir, ckpt.linked_dirs)
    plan = make_plan(ckpt, output_dir, target)
    check_going_back(plan)
    if args.dry_run:
        code = run_dry_run(args, plan, advice, console)
        return max(code, run_engine_check(args, ckpt, plan, console)) if args.engine else code
    if args.verify:
        code = run_verify(args, plan, advice, console)
        return max(code, run_engine_check(args, ckpt, plan, console)) if args.engine else code
    return run_convert(args, plan, advice, console)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse combinations of options that make no sense, before reading anything: every option
    given either takes effect or is refused here."""
    if not args.input.strip():
        # Path("") is the current folder: an unset "$VAR" must not convert whatever folder the shell is in.
        raise UsageError("INPUT is empty; give the model folder (is the variable holding it unset?)")
    if args.tp is not None and args.block_size is not None:
        raise UsageError("give --tp or --block-size, not both")
    if (args.tp is not None and args.tp < 1) or args.workers < 1:
        raise UsageError("--tp and --workers take a positive number")
    if args.ep and args.tp is None:
        raise UsageError("--ep goes with --tp N")
    if args.restore and (args.in_place or args.output or args.block_size or args.tp or args.verify
                         or args.dry_run or args.force or args.workers != 1):
        raise UsageError("--restore takes only INPUT (and --no-reflink, --quiet, --json): it gives back "
                         "the files an --in-place run replaced")
    if args.in_place and args.output:
        raise UsageError("--in-place converts INPUT itself; it takes no -o")
    if args.engine and (args.tp is None or not (args.verify or args.dry_run) or args.in_place):
        raise UsageError("--engine checks at a tensor-parallel degree: give --tp N and --verify or --dry-run "
                         "(not --in-place)")
    if args.in_place and args.verify:
        raise UsageError("--verify compares the output with the input, which --in-place replaces; "
                         "convert to a separate folder to verify, or use --restore to undo")
    if args.in_place and args.workers != 1:
        raise UsageError("--in-place replaces one shard at a time to need one shard of extra disk; "
                         "--workers needs a separate output (-o)")
    if args.in_place and args.force:
        raise UsageError("--in-place always resumes from the shards on disk and has nothing to --force; "
                         "--restore undoes it")
    if args.dry_run and args.verify:
        raise UsageError("--dry-run writes nothing, so there is nothing to --verify; run without --dry-run")


def pick_target(args: argparse.Namespace, ckpt: Checkpoint, advice: TPAdvice,
                console: Console) -> tuple[int, int] | None:
    """The target block from --tp or --block-size; None (and the answer said) when there is
    nothing to do."""
    if args.tp is None:
        target = parse_block_size(args.block_size or "64")
        if target == ckpt.source_block:
            nothing_to_do(console, f"the checkpoint already uses {block_name(target)} blocks: nothing to convert "
                                   "(was it converted already?)")
            return None
        return target
    target = choose_block_for_tp(advice, args.tp, args.ep)
    mode = f"TP{args.tp}" + (" with --ep" if args.ep else "")
    if target is None:
        nothing_to_do(console, f"the checkpoint's {block_name(ckpt.source_block)} blocks already load at {mode}; "
                               "nothing to convert")
    else:
        why = advice.failure(args.tp, args.ep, ckpt.source_block)
        console.result["tp_reason"] = why
        console.say(f"{mode} needs {block_name(target)} blocks: {why}")
    return target


def nothing_to_do(console: Console, reason: str) -> None:
    console.result.update(outcome="nothing to do", reason=reason)
    console.say(reason, even_quiet=True)


def refuse_unfinished_in_place(folder: Path) -> None:
    """A folder an --in-place run left half-converted is neither the old checkpoint nor the new one:
    say how to finish or undo it instead of failing on its first converted scale."""
    try:
        run = json.loads((folder / STATE_DIR / "run.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(run, dict) or run.get("mode") != "in-place":
        return
    recorded = load_in_place_state(folder)
    if recorded is None:
        return
    ckpt, target = recorded
    plan = make_plan(ckpt, folder, target)
    if not (all(shard_is_complete(folder / s.name, s) for s in plan.shards)
            and same_file_content(folder / CONFIG_NAME, plan.config_text.encode())):
        raise _fail(folder, f"is half-way through an --in-place conversion to {block_name(target)}; finish it "
                            "with --in-place or undo it with --restore, then run this again")


def check_going_back(plan: Plan) -> None:
    """A target larger than the source block undoes an earlier conversion to smaller blocks; on a
    checkpoint quantized at its own block it cannot work, and the message says so first."""
    source, target = plan.source_block, plan.target_block
    if not all(t >= s for s, t in zip(source, target)):
        return
    for shard in plan.shards:
        with open(shard.source, "rb") as f:
            for p in shard.scales:
                try:
                    new_scale_bytes(f.fileno(), p, shard.name)
                except ConversionError:
                    raise _fail(shard.name, f"{p.name}: --block-size {block_name(target)} is larger than the source "
                                            f"block {block_name(source)}, which only undoes an earlier conversion to "
                                            f"smaller blocks (every scale repeated), and this scale is not repeated; "
                                            f"give a block that divides {block_name(source)}, such as "
                                            f"{block_name((source[0] // 2, source[1] // 2))}") from None


def copy_policy(args: argparse.Namespace) -> str:
    return "no-share" if args.no_reflink else "auto"


def run_convert(args: argparse.Namespace, plan: Plan, advice: TPAdvice, console: Console) -> int:
    """Write the output folder (or keep the finished one), then say what to run next."""
    summary = convert(plan, force=args.force, copy=copy_policy(args), workers=args.workers, quiet=args.quiet)
    report_summary(plan, summary, console)
    report_next_step(plan, advice, args, console)
    return 0


def run_verify(args: argparse.Namespace, plan: Plan, advice: TPAdvice, console: Console) -> int:
    """Convert unless a finished output is there, then compare every byte of it with the input.
    A finished output is checked as it is and never "repaired" (only --force rewrites it)."""
    safetensors_reader()                          # refuse before converting if it cannot run
    out = plan.output_dir
    finished = out.is_dir() and any(out.iterdir()) and not os.path.lexists(out / STATE_DIR)
    if args.force or not finished:
        summary = convert(plan, force=args.force, copy=copy_policy(args), workers=args.workers,
                          quiet=args.quiet)
        report_summary(plan, summary, console)
    code = report_verification(plan, verify_output(plan, quiet=args.quiet), console)
    if code == 0:
        report_next_step(plan, advice, args, console)
    return code


def run_dry_run(args: argparse.Namespace, plan: Plan, advice: TPAdvice, console: Console) -> int:
    """Print the plan and what OUTPUT holds now; write nothing."""
    info = describe_plan(plan, advice)
    info.update(in_place=False, workers=args.workers, copy=copy_policy(args),
                output_state=describe_output_state(plan, args.force),
                serve=serving_hint(plan, advice, args))
    return report_plan(info, console)


def run_in_place(args: argparse.Namespace, source: InputFolder, console: Console) -> int:
    """Convert INPUT itself (or resume doing so), or with --dry-run say how far it is."""
    folder = source.path
    refuse_shared_files_in_place(folder)
    recorded = load_in_place_state(folder) if folder.is_dir() else None
    ckpt = recorded[0] if recorded else read_checkpoint(folder)
    ckpt = dataclasses.replace(ckpt, others=[])   # other files stay where they are
    advice = advise_tp(ckpt)
    if recorded and args.block_size is None and args.tp is None:
        target = recorded[1]                      # re-running a plain --in-place resumes its run
    else:
        target = pick_target(args, ckpt, advice, console)
        if target is None:
            return 0
    if recorded and target != recorded[1]:
        raise _fail(folder, f"was converted in place to {block_name(recorded[1])}; run --restore first "
                            f"to convert it to {block_name(target)}")
    console.result.update(output=str(folder))
    plan = make_plan(ckpt, folder, target)
    check_going_back(plan)
    if args.dry_run:
        info = describe_plan(plan, advice)
        info.update(in_place=True, copy=copy_policy(args),
                    output_state=describe_in_place_state(plan, ckpt, recorded is not None),
                    serve=serving_hint(plan, advice, args))
        return report_plan(info, console)
    summary = convert_in_place(ckpt, target, recorded=bool(recorded), copy=copy_policy(args), quiet=args.quiet)
    report_summary(plan, summary, console)
    report_next_step(plan, advice, args, console)
    return 0


def refuse_shared_files_in_place(folder: Path) -> None:
    """--in-place replaces files; where they are symlinks (a Hugging Face cache snapshot links into
    blobs/, which every revision of the repo shares) that would change files it does not own.
    Checked before anything, the state folder included, is written."""
    if not folder.is_dir():
        return
    linked = sorted(p.name for p in folder.iterdir()
                    if p.is_symlink() and (p.name.endswith(".safetensors") or p.name in (CONFIG_NAME, INDEX_NAME)))
    if linked:
        name = cache_repo_of(folder)
        name = name.split("/")[-1] if name else Path(os.path.abspath(folder)).name
        raise _fail(folder, f"its files are symlinks ({linked[0]} ...), as in a Hugging Face cache snapshot whose "
                            "blobs are shared with the cache; --in-place would change those, so nothing was "
                            f"written. Convert to a separate folder instead: -o ./{name}-Block64x64")


def run_restore(args: argparse.Namespace, source: InputFolder, console: Console) -> int:
    """Give back the original files of a folder converted in place."""
    refuse_restore_of_untouched_links(source.path)
    summary = restore_in_place(source.path, copy=copy_policy(args), quiet=args.quiet)
    console.result.update(outcome=summary.outcome, output=str(source.path), summary=dataclasses.asdict(summary))
    console.say(f"restored {summary.shards_written} shards of {source.path} ({summary.shards_kept} were already "
                f"original): every file is byte-identical to the original, {summary.seconds:.1f} s")
    return 0


def refuse_restore_of_untouched_links(folder: Path) -> None:
    """An in-place run replaces a shard by renaming a new file over it, so a folder whose shards are
    all still symlinks was never converted; a record in it is the leftover of an in-place run that
    older versions refused only after recording (on a Hugging Face cache snapshot)."""
    if not (folder / STATE_DIR).is_dir():
        return
    shards = [p for p in folder.iterdir() if p.name.endswith(".safetensors")]
    if shards and all(p.is_symlink() for p in shards):
        raise _fail(folder, f"every shard is still a symlink (as in a Hugging Face cache snapshot), so nothing was "
                            f"converted in place and there is nothing to restore; remove the leftover record: "
                            f"rm -r {shlex.quote(str(folder / STATE_DIR))}")


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
        "outcome": "planned",
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


def describe_output_state(plan: Plan, force: bool) -> dict:
    """What a run would find in OUTPUT, read-only: new, complete, resumable, or refused."""
    try:
        state = inspect_output(plan, force)
    except ConversionError as e:
        return {"state": "refused", "reason": str(e)}
    if state.kind == "complete" and not force:
        return {"state": "complete", "shards_kept": len(plan.shards), "bytes_to_write": 0}
    if force:
        state = OutputState(state.kind)
    kept = sorted(state.done_shards)
    return {"state": state.kind if not force else "rewrite", "shards_kept": len(kept), "kept": kept,
            "bytes_to_write": bytes_to_write(plan, state, reflink=False)}


def describe_in_place_state(plan: Plan, ckpt: Checkpoint, recorded: bool) -> dict:
    """How far an --in-place conversion of INPUT is, read-only (the checks convert_in_place makes)."""
    try:
        todo = shards_to_replace(ckpt, plan, forward=True)
    except ConversionError as e:
        return {"state": "refused", "reason": str(e)}
    left = {s.name for s in todo}
    done = sorted(s.name for s in plan.shards if s.name not in left)
    finished = (recorded and not todo
                and same_file_content(plan.output_dir / CONFIG_NAME, plan.config_text.encode()))
    return {"state": "complete" if finished else "resume" if recorded else "new", "shards_kept": len(done),
            "kept": done, "bytes_to_write": sum(s.out_size for s in todo)}


def print_plan(info: dict) -> None:
    say = _print_stdout
    say(f"plan: {info['input']} -> {info['output']}")
    say(f"  blocks          {block_name(info['source_block'])} -> {block_name(info['target_block'])}")
    say(f"  shards          {info['shards']} ({info['fp8_weights']} FP8 weights, {info['scales']} scales to resize, "
        f"{info['other_files']} other files to copy)")
    for ex in info["scale_examples"]:
        say(f"    e.g. {ex['tensor']}: weight {ex['weight_shape']}, "
            f"scale {ex['scale_before']} -> {ex['scale_after']} {ex['dtype']}")
    say(f"  bytes to write  {human_bytes(info['bytes_out'])} "
        f"(copy-on-write filesystems share {human_bytes(info['bytes_shareable'])} of it with the input)")
    if info.get("in_place"):
        say(f"  in place: peak extra disk {human_bytes(info['in_place_extra_bytes'])} (the largest new shard)")
    if info["free_bytes"] is not None:
        say(f"  free space      {human_bytes(info['free_bytes'])}")
    label = "input now" if info.get("in_place") else "output now"
    say(f"  {label:<16}{describe_state_text(info['output_state'])}")
    say("  largest block each tensor-parallel degree can load (EP: experts not split):")
    say("    ranks" + "".join(f"{tp:>6}" for tp in info["tp"]))
    for key, label in (("tp", "TP   "), ("tp_ep", "TP+EP")):
        say(f"    {label}" + "".join(f"{edge or '-':>6}" for edge in info[key].values()))
    if info["tp_unknown_weights"]:
        say(f"  unknown layer names, assumed split on both dims: {', '.join(info['tp_unknown_weights'][:5])}"
            + (" ..." if len(info["tp_unknown_weights"]) > 5 else ""))


def describe_state_text(state: dict) -> str:
    """One line for an output state.

    >>> describe_state_text({"state": "resume", "shards_kept": 2, "kept": ["a", "b"], "bytes_to_write": 4000})
    'resumable: 2 finished shards kept (a, b), 4.0 kB still to write'
    """
    kind = state["state"]
    if kind == "refused":
        return f"would be refused: {state['reason']}"
    if kind == "complete":
        return "already complete: nothing to do"
    if kind == "new":
        return "nothing yet: everything is written"
    if kind == "rewrite":
        return f"--force: every shard is rewritten, {human_bytes(state['bytes_to_write'])} to write"
    kept = ", ".join(state["kept"][:3]) + (" ..." if len(state["kept"]) > 3 else "")
    return (f"resumable: {state['shards_kept']} finished shards kept ({kept}), "
            f"{human_bytes(state['bytes_to_write'])} still to write")


def report_plan(info: dict, console: Console) -> int:
    console.result.update(info)
    if not console.as_json:
        print_plan(info)
        print_serving_hint(info["serve"], console)
    return 0


def reported_outcome(plan: Plan, s: Summary) -> Outcome:
    """What to tell: a run that found every shard already converted did nothing worth reporting,
    even if it rewrote config.json or the index to finish an interrupted run."""
    if s.outcome != "restored" and s.shards_written == 0 and s.shards_kept == len(plan.shards):
        return "already complete"
    return s.outcome


def report_summary(plan: Plan, s: Summary, console: Console) -> None:
    console.result.update(outcome=reported_outcome(plan, s), output=str(plan.output_dir),
                          source_block=list(plan.source_block), target_block=list(plan.target_block),
                          summary=dataclasses.asdict(s))
    if not (console.quiet or console.as_json):
        print_summary(plan, s)


def print_summary(plan: Plan, s: Summary) -> None:
    if reported_outcome(plan, s) == "already complete":
        _print_stdout(f"{plan.output_dir}: already converted to {block_name(plan.target_block)}; nothing to do")
        return
    kept = f", {s.shards_kept} kept from an earlier run" if s.shards_kept else ""
    where = " in place" if s.outcome == "converted in place" else ""
    _print_stdout(f"converted {s.shards_written} shards{where}{kept}: {s.scales} scales resized "
                  f"{block_name(plan.source_block)} -> {block_name(plan.target_block)}, "
                  f"{human_bytes(s.bytes_written)} written ({human_bytes(s.bytes_shared)} shared with the input), "
                  f"{s.seconds:.1f} s -> {plan.output_dir}")


# ---- The next step: serving the result -----------------------------------------------------------
# DeepGEMM and the CUTLASS block kernels take only 128x128 blocks, and some engine versions pick
# them from the weight shape alone; any other block must run on the Triton block-FP8 kernels.
# SGLang: `--fp8-gemm-backend triton` (recent) or SGLANG_ENABLE_JIT_DEEPGEMM=0 (older); vLLM:
# VLLM_USE_DEEP_GEMM=0 (its Triton fused MoE takes any block). See the README's Serve section.

def serving_tp(plan: Plan, advice: TPAdvice, args: argparse.Namespace) -> int:
    """The TP degree to suggest: the one asked for, else the largest the new block can load."""
    if args.tp:
        return args.tp
    return max((tp for tp in TP_SIZES if advice.failure(tp, False, plan.target_block) is None), default=1)


def serving_hint(plan: Plan, advice: TPAdvice, args: argparse.Namespace) -> dict:
    """The SGLang and vLLM command lines that serve the output at the TP degree its block allows."""
    tp = serving_tp(plan, advice, args)
    ep = bool(getattr(args, "ep", False))
    model = shlex.quote(str(Path(os.path.abspath(plan.output_dir))))
    triton = plan.target_block != (128, 128)
    sglang = (f"python -m sglang.launch_server --model-path {model} --tp {tp}"
              + (f" --ep-size {tp}" if ep else "") + (" --fp8-gemm-backend triton" if triton else ""))
    vllm = (("VLLM_USE_DEEP_GEMM=0 " if triton else "") + f"vllm serve {model} --tensor-parallel-size {tp}"
            + (" --enable-expert-parallel" if ep else ""))
    hint = {"tp": tp, "ep": ep, "block": list(plan.target_block), "sglang": sglang, "vllm": vllm}
    if triton:
        hint["sglang_older"] = sglang.replace(" --fp8-gemm-backend triton", "").replace(
            "python -m", "SGLANG_ENABLE_JIT_DEEPGEMM=0 python -m", 1)
    return hint


def print_serving_hint(hint: dict, console: Console) -> None:
    if console.quiet or console.as_json:
        return
    why = (f" ({block_name(hint['block'])} blocks need the Triton block-FP8 kernels: DeepGEMM takes only 128x128)"
           if "sglang_older" in hint else "")
    lines = [f"next: serve it at TP{hint['tp']}{why}", f"  SGLang: {hint['sglang']}"]
    if "sglang_older" in hint:
        lines.append(f"          older SGLang: {hint['sglang_older']}")
    lines.append(f"  vLLM:   {hint['vllm']}")
    if hint["tp"] > 8:
        lines.append("  (more than 8 GPUs: add each engine's multi-node options, e.g. SGLang's --nnodes, "
                     "--node-rank, --dist-init-addr)")
    for line in lines:
        console.say(line)


def report_next_step(plan: Plan, advice: TPAdvice, args: argparse.Namespace, console: Console) -> None:
    hint = serving_hint(plan, advice, args)
    console.result["serve"] = hint
    print_serving_hint(hint, console)


def report_verification(plan: Plan, report: VerifyReport, console: Console) -> int:
    console.result["verify"] = dataclasses.asdict(report)
    for problem in report.problems[:20]:
        print(f"{PROG}: verify: {problem}", file=sys.stderr)
    if report.problems:
        more = len(report.problems) - 20
        raise ConversionError(f"{plan.output_dir} does NOT match {plan.input_dir}: {len(report.problems)} "
                              "problem(s)" + (f", {more} not shown" if more > 0 else "")
                              + "; re-run with --force to rewrite it")
    console.result["outcome"] = "verified"
    console.say(f"verified {plan.output_dir}: {report.tensors_equal} tensors byte-identical, "
                f"{report.scales_replicated} scales exact replications, {report.files_equal} files equal "
                f"({human_bytes(report.bytes_compared)} compared; headers read back with {report.reader})", even_quiet=True)
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def _describe_os_error(e: OSError, default_output: bool = False) -> str:
    return _os_error_text(e, default_output).replace("\n", " ").replace("\r", " ")   # one line, whatever the file name


def _os_error_text(e: OSError, default_output: bool) -> str:
    where = e.filename or "output"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: disk full; the partial file was removed. Free space and re-run the same command to resume"
    if e.errno == errno.EFBIG:
        return f"{where}: file too large for this filesystem or ulimit -f; the partial file was removed. " \
               "Raise the limit and re-run the same command to resume"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and default_output:
        return f"{where}: {e.strerror or e}; the default output folder is not writable here, choose a writable folder with -o"
    return f"{where}: {e.strerror or e}"


def main_exit() -> None:
    """Entry point of the `resize-block-size` console script."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_closed()
    sys.exit(code)


if __name__ == "__main__":
    main_exit()
