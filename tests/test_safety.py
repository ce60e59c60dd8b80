"""Safety of the converter: what it refuses, what it never touches, and how it survives a crash.

1. Validation before the first output byte: every malformed input is refused with exactly one
   line on stderr naming the file (and tensor), no traceback, the input unchanged and no output
   folder created. Corrupt shards are written by hand (`write_safetensors`).
2. Output safety: OUTPUT may not be INPUT (in any spelling), inside it or contain it; a non-empty
   OUTPUT that is not an unfinished run of the same conversion is refused untouched; symlinks
   planted in OUTPUT are never followed; the input is opened read-only (`chattr +i`).
3. Atomic shards and resume: kill -9 at many moments, then the same command again, gives output
   byte-identical to an uninterrupted run; resume keeps good shards and redoes tampered ones;
   --force redoes all; a second concurrent run is refused.
4. Disk space: the pre-check (small loop-mounted ext4) and a full disk mid-run (RLIMIT_FSIZE).
5. Signals: SIGINT and SIGTERM stop cleanly and the re-run finishes the job.

The many small cases run the console script's `main_exit()` in a forked child of this process
(conftest's `cli()`: no second interpreter start); set RBS_TEST_SUBPROCESS=1 to run them
through `python resize_block_size.py` instead (all but the two that patch the tool in the child).
The big checkpoint's conversions (kill, resume, disk, signals) and the immutable-input run are
always real subprocesses.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from safetensors import safe_open

from conftest import Tensor, cli, layout, snapshot, start, tc, write_safetensors

import resize_block_size as rbs

INDEX = "model.safetensors.index.json"
STATE = ".resize_block_size"


# ---------------------------------------------------------------------------------------------
# Helpers: running the command line, looking at folders
# ---------------------------------------------------------------------------------------------

def error_line(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused run (asserting the run was refused cleanly)."""
    assert result.returncode != 0, f"expected a refusal, got exit 0\nstdout: {result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{result.stderr}"
    return lines[0]


def assert_words(line: str, words: list[str]) -> None:
    missing = [w for w in words if w not in line]
    assert not missing, f"message lacks {missing}: {line}"


def no_partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.partial")) if folder.exists() else []


def chattr_works(probe_dir: Path) -> str | None:
    """None if `chattr +i` works on this filesystem, else why not."""
    probe = probe_dir / ".chattr-probe"
    probe.write_bytes(b"x")
    try:
        r = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
    except FileNotFoundError:
        return "chattr is not installed"
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        probe.unlink()
    if r.returncode:
        return f"chattr +i is not supported here: {r.stderr.strip()}"
    return None


# ---------------------------------------------------------------------------------------------
# Hand-written checkpoints (conftest's `write_safetensors`), with random tensors
# ---------------------------------------------------------------------------------------------

NO_NAN = bytes.maketrans(b"\x7f\xff", b"\x7e\xfe")  # keep random bytes finite e4m3fn values


def fp8(rng: random.Random, *shape: int) -> Tensor:
    n = 1
    for d in shape:
        n *= d
    return ("F8_E4M3", list(shape), rng.randbytes(n).translate(NO_NAN))


def f32_scale(rng: random.Random, *shape: int) -> Tensor:
    n = 1
    for d in shape:
        n *= d
    return ("F32", list(shape), struct.pack(f"<{n}f", *(rng.uniform(1e-4, 1e-2) for _ in range(n))))


def bf16(rng: random.Random, *shape: int) -> Tensor:
    n = 1
    for d in shape:
        n *= d
    return ("BF16", list(shape), struct.pack(f"<{n}e", *(rng.uniform(-1, 1) for _ in range(n))))


# A hand-written two-shard checkpoint. Shard 2 holds an FP8 weight whose 256 x 192 shape needs
# a [2, 2] scale at 128x128 blocks, its scale, and a BF16 norm, in that order.
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
DOWN_SCALE = DOWN + "_scale_inv"
NORM = "model.norm.weight"


def hand_shards(seed: int = 0) -> dict[str, dict[str, Tensor]]:
    rng = random.Random(seed)
    return {
        SHARD1: {"model.embed_tokens.weight": bf16(rng, 16, 128),
                 O_PROJ: fp8(rng, 128, 256),
                 O_PROJ + "_scale_inv": f32_scale(rng, 1, 2)},
        SHARD2: {DOWN: fp8(rng, 256, 192),
                 DOWN_SCALE: f32_scale(rng, 2, 2),
                 NORM: bf16(rng, 128)},
    }


def write_hand_checkpoint(folder: Path, shards: dict[str, dict[str, Tensor]] | None = None,
                          config: dict | None = None) -> Path:
    """config.json, the index and the shards of `hand_shards()` (or `shards`)."""
    shards = hand_shards() if shards is None else shards
    folder.mkdir(parents=True)
    for name, tensors in shards.items():
        write_safetensors(folder / name, *layout(tensors))
    weight_map = {t: name for name, tensors in shards.items() for t in tensors}
    index = {"metadata": {"total_size": sum(len(raw) for ts in shards.values() for _, _, raw in ts.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config or tc.deepseek_v3_config(), indent=2) + "\n")
    return folder


def rewrite_shard2(model: Path, edit: Callable[[dict, bytes], tuple[dict, bytes]]) -> None:
    """Replace shard 2 by `edit(header, data)` of its correct header and data."""
    write_safetensors(model / SHARD2, *edit(*layout(hand_shards()[SHARD2])))


def edit_config(model: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def edit_index(model: Path, edit: Callable[[dict], None]) -> None:
    index = json.loads((model / INDEX).read_text())
    edit(index)
    (model / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def drop_tensor(model: Path, name: str) -> None:
    shards = hand_shards()
    del shards[SHARD2][name]
    write_safetensors(model / SHARD2, *layout(shards[SHARD2]))
    edit_index(model, lambda index: index["weight_map"].pop(name))


def set_quant(key: str, value: object) -> Callable[[dict], None]:
    return lambda config: config["quantization_config"].__setitem__(key, value)


def test_hand_written_checkpoint_is_valid_and_converts(tmp_path: Path) -> None:
    """The base of every corruption below is a checkpoint safetensors and the tool accept."""
    model = write_hand_checkpoint(tmp_path / "model")
    for shard in (SHARD1, SHARD2):
        with safe_open(model / shard, framework="pt") as f:
            assert set(f.keys()) == set(hand_shards()[shard])
    result = cli(model, "-o", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    with safe_open(tmp_path / "out" / SHARD2, framework="pt") as f:
        assert list(f.get_slice(DOWN_SCALE).get_shape()) == [4, 3]


# ---------------------------------------------------------------------------------------------
# 1. Validate everything before the first output byte
# ---------------------------------------------------------------------------------------------

@dataclass
class Invalid:
    """A refused input: the command-line arguments and the key words its one line must hold."""
    args: list[object]
    words: list[str]
    cwd: Path | None = None
    any_of: list[str] = field(default_factory=list)   # at least one of these, too


INVALID: dict[str, Callable[[Path], Invalid]] = {}


def invalid(case_id: str):
    def register(build: Callable[[Path], Invalid]) -> Callable[[Path], Invalid]:
        INVALID[case_id] = build
        return build
    return register


def model_at(root: Path) -> Path:
    return write_hand_checkpoint(root / "model")


@invalid("input-missing")
def _(root: Path) -> Invalid:
    return Invalid([root / "DeepSeek-V3"], [str(root / "DeepSeek-V3"), "does not exist"])


@invalid("input-is-a-file")
def _(root: Path) -> Invalid:
    path = write_safetensors(root / "model.safetensors", *layout(hand_shards()[SHARD2]))
    return Invalid([path], [str(path), "not a folder"])


@invalid("no-config-json")
def _(root: Path) -> Invalid:
    model = model_at(root)
    (model / "config.json").unlink()
    return Invalid([model], [str(model), "config.json"])


@invalid("config-json-not-valid-json")
def _(root: Path) -> Invalid:
    model = model_at(root)
    (model / "config.json").write_text('{"quantization_config": {"quant_method": "fp8",\n')
    return Invalid([model], [str(model / "config.json"), "not valid JSON"])


@invalid("config-json-not-an-object")
def _(root: Path) -> Invalid:
    model = model_at(root)
    (model / "config.json").write_text("[]\n")
    return Invalid([model], [str(model / "config.json"), "not a JSON object"])


@invalid("no-quantization-config")
def _(root: Path) -> Invalid:
    model = model_at(root)
    edit_config(model, lambda c: c.pop("quantization_config"))
    return Invalid([model], ["config.json", "no quantization_config", "not quantized"])


@invalid("quant-method-compressed-tensors")
def _(root: Path) -> Invalid:
    model = model_at(root)
    edit_config(model, set_quant("quant_method", "compressed-tensors"))
    return Invalid([model], ["config.json", "compressed-tensors", "not supported"])


@invalid("quant-method-mxfp8")
def _(root: Path) -> Invalid:
    model = model_at(root)
    edit_config(model, set_quant("quant_method", "mxfp8"))
    return Invalid([model], ["config.json", "mxfp8", "not supported"])


@invalid("weight-block-size-missing")
def _(root: Path) -> Invalid:
    model = model_at(root)
    edit_config(model, lambda c: c["quantization_config"].pop("weight_block_size"))
    return Invalid([model], ["config.json", "weight_block_size", "not block-quantized"])


@invalid("weight-block-size-null")
def _(root: Path) -> Invalid:
    model = model_at(root)
    edit_config(model, set_quant("weight_block_size", None))
    return Invalid([model], ["config.json", "weight_block_size", "not block-quantized"])


for _value, _id in (([128], "one-int"), ([128, 0], "zero"), (["128", 128], "string"),
                    ([True, 128], "bool"), ([128, 128, 128], "three-ints"), ([-128, 128], "negative"),
                    ([128.0, 128], "float"), ("128x128", "not-a-list")):
    def _bad_block(root: Path, value: object = _value) -> Invalid:
        model = model_at(root)
        edit_config(model, set_quant("weight_block_size", value))
        return Invalid([model], ["config.json", "weight_block_size", json.dumps(value), "two positive integers"])
    invalid(f"weight-block-size-{_id}")(_bad_block)


@invalid("target-block-does-not-divide-source")
def _(root: Path) -> Invalid:
    return Invalid([model_at(root), "--block-size", "48"], ["48x48", "does not divide", "128x128"])


@invalid("target-block-larger-than-source-scales-not-replicated")
def _(root: Path) -> Invalid:
    # Larger blocks are allowed only to go back: every scale must be a replication, and random
    # scales are not. The first scale checked is in shard 1.
    return Invalid([model_at(root), "--block-size", "256"],
                   [SHARD1, O_PROJ + "_scale_inv", "256x256", "larger than the source block 128x128", "divides"])


@invalid("target-block-larger-than-source-not-a-multiple")
def _(root: Path) -> Invalid:
    return Invalid([model_at(root), "--block-size", "192"], ["192x192", "larger", "not a multiple", "128x128"])


@invalid("target-block-one-dim-smaller-one-larger")
def _(root: Path) -> Invalid:
    return Invalid([model_at(root), "--block-size", "64x256"], ["64x256", "smaller", "larger"])


@invalid("target-block-below-16")
def _(root: Path) -> Invalid:
    return Invalid([model_at(root), "--block-size", "8"], ["8x8", "below 16"])


@invalid("block-size-not-a-number")
def _(root: Path) -> Invalid:
    return Invalid([model_at(root), "--block-size", "abc"], ["--block-size", "'abc'"])


@invalid("no-safetensors-files")
def _(root: Path) -> Invalid:
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tc.deepseek_v3_config()))
    return Invalid([model], [str(model), "no .safetensors files"])


@invalid("index-names-missing-shard")
def _(root: Path) -> Invalid:
    model = model_at(root)
    edit_index(model, lambda i: i["weight_map"].__setitem__(NORM, "model-00003-of-00002.safetensors"))
    return Invalid([model], [INDEX, NORM, "model-00003-of-00002.safetensors", "missing"])


@invalid("index-names-shard-without-the-tensor")
def _(root: Path) -> Invalid:
    model = model_at(root)
    edit_index(model, lambda i: i["weight_map"].__setitem__(NORM, SHARD1))
    return Invalid([model], [INDEX, NORM, SHARD1, "does not hold it"])


for _shard, _id in (("../x.safetensors", "parent"), ("sub/x.safetensors", "subfolder"),
                    ("sub\\x.safetensors", "backslash")):
    def _path_in_index(root: Path, shard: str = _shard) -> Invalid:
        model = model_at(root)
        # The named file exists, so only the path separator can be the reason to refuse it.
        target = model / shard.replace("\\", "/")
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(model / SHARD2, target)
        edit_index(model, lambda i: i["weight_map"].__setitem__(NORM, shard))
        return Invalid([model], [INDEX, NORM, repr(shard), "not a plain file name"])
    invalid(f"index-shard-name-with-path-{_id}")(_path_in_index)


@invalid("shard-shorter-than-8-bytes")
def _(root: Path) -> Invalid:
    model = model_at(root)
    (model / SHARD2).write_bytes(b"\x10\x00\x00")
    return Invalid([model], [SHARD2, "3 bytes", "too short"])


@invalid("header-length-beyond-the-file")
def _(root: Path) -> Invalid:
    model = model_at(root)
    header, data = layout(hand_shards()[SHARD2])
    size = 8 + len(json.dumps(header, separators=(",", ":"))) + 8 + len(data)
    write_safetensors(model / SHARD2, header, data, header_len=size)
    return Invalid([model], [SHARD2, "header length", "past the end"])


@invalid("header-length-above-100MB")
def _(root: Path) -> Invalid:
    model = model_at(root)
    # A sparse file big enough to hold the claimed header: only the size limit can refuse it.
    write_safetensors(model / SHARD2, b"{}", header_len=100_000_008, file_size=8 + 100_000_008 + 64)
    return Invalid([model], [SHARD2, "100000008", "100 MB"])


@invalid("header-not-json")
def _(root: Path) -> Invalid:
    model = model_at(root)
    write_safetensors(model / SHARD2, b'{"model.norm.weight": {"dtype": ')
    return Invalid([model], [SHARD2, "not valid JSON"])


@invalid("header-is-a-json-list")
def _(root: Path) -> Invalid:
    model = model_at(root)
    header, data = layout(hand_shards()[SHARD2])
    write_safetensors(model / SHARD2, [header], data)
    return Invalid([model], [SHARD2, "not a JSON object"])


@invalid("unknown-dtype")
def _(root: Path) -> Invalid:
    model = model_at(root)

    def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
        header[NORM]["dtype"] = "F9_E9M9"
        return header, data
    rewrite_shard2(model, edit)
    return Invalid([model], [SHARD2, NORM, "unknown dtype", "F9_E9M9"])


def _offsets(case_id: str, make: Callable[[int, int], list[int]], words: list[str],
             any_of: list[str] = ()) -> None:
    def build(root: Path) -> Invalid:
        model = model_at(root)

        def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
            header[NORM]["data_offsets"] = make(*header[NORM]["data_offsets"])
            return header, data
        rewrite_shard2(model, edit)
        return Invalid([model], [SHARD2, NORM, *words], any_of=list(any_of))
    invalid(f"offsets-out-of-range-{case_id}")(build)


_offsets("negative", lambda b, e: [-256, 0], ["data_offsets"])
_offsets("reversed", lambda b, e: [e, b], ["data_offsets"])
# The norm's 256 bytes placed far past the end of a file that holds them at [b, e]: the problem
# to report is that its data lies outside the file, not a gap in front of it.
_offsets("past-end-of-file", lambda b, e: [b + (1 << 40), e + (1 << 40)], [],
         any_of=["past the end", "beyond", "out of range", "outside", "end of the file"])


@invalid("overlapping-tensors")
def _(root: Path) -> Invalid:
    model = model_at(root)

    def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
        begin, end = header[DOWN_SCALE]["data_offsets"]
        header[DOWN_SCALE]["data_offsets"] = [begin - 8, end - 8]   # into the weight's last bytes
        header[NORM]["data_offsets"] = [o - 8 for o in header[NORM]["data_offsets"]]
        return header, data[:-8]
    rewrite_shard2(model, edit)
    return Invalid([model], [SHARD2, DOWN_SCALE, "overlaps"])


@invalid("hole-between-tensors")
def _(root: Path) -> Invalid:
    model = model_at(root)

    def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
        begin, _ = header[NORM]["data_offsets"]
        header[NORM]["data_offsets"] = [o + 64 for o in header[NORM]["data_offsets"]]
        return header, data[:begin] + bytes(64) + data[begin:]
    rewrite_shard2(model, edit)
    return Invalid([model], [SHARD2, NORM, "64 unused bytes", "holes"])


@invalid("byte-length-not-shape-times-itemsize")
def _(root: Path) -> Invalid:
    model = model_at(root)

    def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
        header[NORM]["data_offsets"][1] -= 4
        return header, data[:-4]
    rewrite_shard2(model, edit)
    return Invalid([model], [SHARD2, NORM, "252 bytes", "BF16 [128]", "256"])


@invalid("truncated-shard")
def _(root: Path) -> Invalid:
    model = model_at(root)
    rewrite_shard2(model, lambda header, data: (header, data[:-100]))
    return Invalid([model], [SHARD2, "truncated"])


@invalid("fp8-weight-without-scale")
def _(root: Path) -> Invalid:
    model = model_at(root)
    drop_tensor(model, DOWN_SCALE)
    return Invalid([model], [SHARD2, DOWN, f"without {DOWN_SCALE}"])


@invalid("scale-without-weight")
def _(root: Path) -> Invalid:
    model = model_at(root)
    drop_tensor(model, DOWN)
    return Invalid([model], [SHARD2, DOWN_SCALE, "without its weight"])


def _scale_shape(case_id: str, shape: list[int], words: list[str]) -> None:
    def build(root: Path) -> Invalid:
        model = model_at(root)
        shards = hand_shards()
        shards[SHARD2][DOWN_SCALE] = f32_scale(random.Random(1), *shape)
        write_safetensors(model / SHARD2, *layout(shards[SHARD2]))
        return Invalid([model], [SHARD2, DOWN_SCALE, *words])
    invalid(case_id)(build)


_scale_shape("scale-shape-does-not-match-weight", [3, 2], ["[3, 2]", "[256, 192]", "expected [2, 2]"])
_scale_shape("scale-shape-for-64x64-blocks", [4, 3], ["[4, 3]", "expected [2, 2]"])
_scale_shape("scale-1d", [4], ["[4]", "expected [2, 2]"])


@pytest.mark.parametrize("case_id", list(INVALID))
def test_invalid_input_is_refused_before_writing_anything(case_id: str, tmp_path: Path) -> None:
    """Non-zero exit, one line naming the file (and tensor), no traceback, nothing written."""
    case = INVALID[case_id](tmp_path)
    before = snapshot(tmp_path, follow_links=False)     # the input and its parent: no output appears
    result = cli(*case.args, cwd=case.cwd)
    line = error_line(result)
    assert_words(line, case.words)
    if case.any_of:
        assert any(w in line for w in case.any_of), f"message says none of {case.any_of}: {line}"
    assert snapshot(tmp_path, follow_links=False) == before


# ---------------------------------------------------------------------------------------------
# 2. Output safety
# ---------------------------------------------------------------------------------------------

# How to spell an output that is, is inside, or contains the input folder `model` in `root`.
SAME, INSIDE, CONTAINS = "is the input folder", "inside the input folder", "contains the input folder"
OUTPUT_SPELLINGS: dict[str, tuple[Callable[[Path, Path], tuple[list[object], Path | None]], str]] = {
    "o-INPUT": (lambda root, m: ([m, "-o", m], None), SAME),
    "o-INPUT-slash": (lambda root, m: ([m, "-o", f"{m}/"], None), SAME),
    "o-INPUT-dot": (lambda root, m: ([m, "-o", f"{m}/."], None), SAME),
    "o-INPUT-dotdot-NAME": (lambda root, m: ([m, "-o", f"{m}/../{m.name}"], None), SAME),
    "o-symlink-to-INPUT": (lambda root, m: ([m, "-o", symlink(root / "link", m)], None), SAME),
    "cwd-INPUT-o-dot": (lambda root, m: ([m, "-o", "."], m), SAME),
    "cwd-INPUT-relative-input-dot": (lambda root, m: ([".", "-o", f"../{m.name}"], m), SAME),
    "inside-INPUT": (lambda root, m: ([m, "-o", m / "converted"], None), INSIDE),
    "inside-INPUT-existing-subfolder": (lambda root, m: ([m, "-o", subfolder(m / "sub")], None), INSIDE),
    "inside-INPUT-via-symlink": (lambda root, m: ([m, "-o", symlink(root / "link", m) / "out"], None), INSIDE),
    "contains-INPUT-parent": (lambda root, m: ([m, "-o", root], None), CONTAINS),
    "contains-INPUT-relative-dotdot": (lambda root, m: ([".", "-o", ".."], m), CONTAINS),
}


def symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def subfolder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("spelling", list(OUTPUT_SPELLINGS))
def test_output_that_is_inside_or_contains_the_input_is_refused(spelling: str, tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    make, words = OUTPUT_SPELLINGS[spelling]
    args, cwd = make(tmp_path, model)
    before = snapshot(tmp_path, follow_links=False)
    line = error_line(cli(*args, cwd=cwd))
    assert_words(line, [words])
    assert snapshot(tmp_path, follow_links=False) == before


def _unfinished_run(model: Path, out: Path, *extra: object) -> None:
    """A run into `out` stopped by a full disk after its first shard (a 45 kB file size limit:
    shard 1 is ~41 kB converted, shard 2 ~50 kB)."""
    result = cli(model, "-o", out, "-q", *extra, before=limit_file_size(45_000))
    assert result.returncode != 0, result.stdout
    assert (out / STATE / "run.json").is_file() and (out / SHARD1).is_file() and not (out / SHARD2).exists(), \
        result.stderr


def _unfinished_other_run(root: Path, model: Path, out: Path) -> list:
    """An unfinished run of the same input to --block-size 32."""
    _unfinished_run(model, out, "--block-size", "32")
    return ["unfinished", "something else"]


OTHER_INPUT_WORDS = [("not empty", "something else", "another", "different")]   # any of these


def _unfinished_other_input(root: Path, model: Path, out: Path) -> list:
    """An unfinished run of another checkpoint of the same architecture (same config, index and
    headers, other weights: DeepSeek-V3 vs R1). Resuming it would mix two models' shards."""
    _unfinished_run(write_hand_checkpoint(root / "other", hand_shards(seed=1)), out)
    return OTHER_INPUT_WORDS


def _finished_other_input(root: Path, model: Path, out: Path) -> list:
    """A finished conversion of another checkpoint of the same architecture: not "already
    converted", it holds other weights."""
    result = cli(write_hand_checkpoint(root / "other", hand_shards(seed=1)), "-o", out, "-q")
    assert result.returncode == 0, result.stderr
    return OTHER_INPUT_WORDS


def _finished_other_run(root: Path, model: Path, out: Path) -> list:
    result = cli(model, "-o", out, "--block-size", "32", "-q")
    assert result.returncode == 0, result.stderr
    return ["not empty"]


def _files(*names: str) -> Callable[[Path, Path, Path], list]:
    def make(root: Path, model: Path, out: Path) -> list:
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(f"someone's {name}\n")
        return ["not empty"]
    return make


def _regular_file(root: Path, model: Path, out: Path) -> list:
    out.rmdir()
    out.write_text("not a folder\n")
    return ["not a folder"]


# Each returns the key words of the refusal (a tuple: any one of them).
FOREIGN_OUTPUTS: dict[str, Callable[[Path, Path, Path], list]] = {
    "unrelated-files": _files("notes.txt", "data/results.csv"),
    "only-a-hidden-file": _files(".keep"),
    "a-file-named-like-a-shard": _files(SHARD1),
    "finished-conversion-to-another-block": _finished_other_run,
    "unfinished-conversion-to-another-block": _unfinished_other_run,
    "unfinished-conversion-of-another-input": _unfinished_other_input,
    "finished-conversion-of-another-input": _finished_other_input,
    "a-regular-file": _regular_file,
}


@pytest.mark.parametrize("kind", list(FOREIGN_OUTPUTS))
def test_existing_output_not_ours_is_refused_untouched(kind: str, tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    words = FOREIGN_OUTPUTS[kind](tmp_path, model, out)
    before = snapshot(tmp_path, follow_links=False)
    line = error_line(cli(model, "-o", out))
    assert_words(line, [str(out)] + [w for w in words if isinstance(w, str)])
    for choices in (w for w in words if isinstance(w, tuple)):
        assert any(c in line for c in choices), f"message says none of {choices}: {line}"
    assert snapshot(tmp_path, follow_links=False) == before


def test_input_is_never_opened_for_writing(ckpt: Path, tmp_path: Path) -> None:
    """The whole conversion (and --verify) works on an immutable input folder."""
    reason = chattr_works(tmp_path)
    if reason:
        pytest.skip(reason)
    before = snapshot(ckpt, follow_links=False)
    subprocess.run(["chattr", "-R", "+i", str(ckpt)], check=True)
    try:
        result = cli(ckpt, "-o", tmp_path / "out", "--verify", "-q", via="python")
    finally:
        subprocess.run(["chattr", "-R", "-i", str(ckpt)], check=True)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(ckpt, follow_links=False) == before
    assert (tmp_path / "out" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# Bigger checkpoints for crash, resume, disk and signal tests
# ---------------------------------------------------------------------------------------------

BIG_SHARD_MB = (4, 5, 6, 7, 8, 10)
BIG_SHARDS = [f"model-{i + 1:05d}-of-{len(BIG_SHARD_MB):05d}.safetensors" for i in range(len(BIG_SHARD_MB))]


def write_big_checkpoint(folder: Path) -> Path:
    """Six shards of 4-10 MB (40 MB): 1 MB FP8 experts of random finite bytes with correct F32
    scales (one per shard 544 rows, whose scale grid gets trimmed at 64), one expert's scale in
    the next shard as in real checkpoints, a BF16 norm per shard, and the usual other files
    (tokenizer, README, subfolders)."""
    rng = random.Random(20240601)
    pending: dict[str, Tensor] = {}
    weight_map: dict[str, str] = {}
    folder.mkdir(parents=True)
    for s, (mb, name) in enumerate(zip(BIG_SHARD_MB, BIG_SHARDS)):
        tensors = dict(pending)
        pending = {}
        for e in range(mb):
            weight = f"model.layers.{s + 1}.mlp.experts.{e}.down_proj.weight"
            tensors[weight] = fp8(rng, 512, 2048) if e else fp8(rng, 544, 1920)
            rows, cols = tensors[weight][1]
            scale = f32_scale(rng, math.ceil(rows / 128), math.ceil(cols / 128))
            if e == mb - 1 and s < len(BIG_SHARD_MB) - 1:
                pending[weight + "_scale_inv"] = scale
            else:
                tensors[weight + "_scale_inv"] = scale
        tensors[f"model.layers.{s + 1}.post_attention_layernorm.weight"] = bf16(rng, 2048)
        write_safetensors(folder / name, *layout(tensors))
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(os.path.getsize(folder / n) for n in BIG_SHARDS)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(tc.deepseek_v3_config(), indent=2) + "\n")
    for rel, content in tc.default_extra_files().items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    return folder


@dataclass
class Big:
    input: Path
    input_tree: dict[str, str]
    reference: Path                 # an uninterrupted conversion
    reference_tree: dict[str, str]
    unfinished: Path                # a conversion killed (-9) after two shards

    def args(self, out: Path, *extra: object) -> list[object]:
        return [self.input, "-o", out, "--no-reflink", "-q", *extra]

    def shards_done(self, out: Path) -> list[str]:
        return [n for n in BIG_SHARDS if (out / n).is_file()]

    def rerun_gives_reference(self, out: Path, *extra: object) -> None:
        """The same command again finishes the job: output identical to the uninterrupted run."""
        result = cli(*self.args(out, *extra), via="python", timeout=120)
        assert result.returncode == 0, result.stderr
        assert not no_partials(out) and not (out / STATE).exists()
        assert snapshot(out, follow_links=False) == self.reference_tree
        assert snapshot(self.input, follow_links=False) == self.input_tree


def limit_file_size(limit: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 60) -> bool:
    """Poll every millisecond until `condition()`; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return condition()
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError("the condition never came true")
        time.sleep(0.001)
    return True


def kill_after(proc: subprocess.Popen, condition: Callable[[], bool]) -> int:
    wait_until(proc, condition)
    proc.kill()
    proc.communicate()
    return proc.returncode


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    root = tmp_path_factory.mktemp("big")
    model = write_big_checkpoint(root / "DeepSeek-big")
    reference = root / "reference"
    cli(model, "-o", reference, "--no-reflink", "-q", via="python", check=True)
    unfinished = root / "unfinished"
    b = Big(model, snapshot(model, follow_links=False), reference, snapshot(reference, follow_links=False), unfinished)
    proc = start(*b.args(unfinished))
    assert kill_after(proc, lambda: len(b.shards_done(unfinished)) >= 2) == -signal.SIGKILL
    assert 2 <= len(b.shards_done(unfinished)) < len(BIG_SHARDS)
    return b


@pytest.fixture
def out(tmp_path: Path):
    """An output path; removed afterwards (these outputs are ~40 MB each)."""
    path = tmp_path / "out"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def copy_unfinished(big: Big, out: Path) -> dict[str, tuple[int, int]]:
    """`out` = a copy of the killed run; returns (inode, mtime_ns) of its finished shards."""
    shutil.copytree(big.unfinished, out, symlinks=True)
    return {n: ident(out / n) for n in big.shards_done(out)}


def ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns)


def test_big_checkpoint_is_valid(big: Big) -> None:
    with safe_open(big.input / BIG_SHARDS[1], framework="pt") as f:
        # shard 1's last scale, 5 weights, 4 of their scales (the 5th is in shard 3), a norm
        assert len(list(f.keys())) == 1 + 5 + 4 + 1
        assert f.get_slice("model.layers.2.mlp.experts.0.down_proj.weight_scale_inv").get_shape() == [5, 15]
    assert sorted(big.reference_tree) == sorted(big.input_tree)


# ---------------------------------------------------------------------------------------------
# 3. Atomic shards and resume
# ---------------------------------------------------------------------------------------------

def _after_seconds(seconds: float) -> Callable[[Big, Path, float], bool]:
    return lambda big, out, started: time.monotonic() - started >= seconds


def _after_shards(n: int) -> Callable[[Big, Path, float], bool]:
    return lambda big, out, started: len(big.shards_done(out)) >= n


KILL_MOMENTS: dict[str, tuple[Callable[[Big, Path, float], bool], bool]] = {
    # moment: (when to kill, whether the run is certainly unfinished then)
    "at-start-0s": (_after_seconds(0), False),
    "after-0.05s": (_after_seconds(0.05), False),      # planning, or the run may be over already
    "after-0.2s": (_after_seconds(0.2), False),
    "first-partial-file": (lambda big, out, t: bool(no_partials(out)), True),
    "after-1-shard": (_after_shards(1), True),
    "after-3-shards": (_after_shards(3), True),
    "after-5-shards": (_after_shards(5), False),       # the last shard may just finish first
}


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_kill_9_then_rerun_gives_identical_output(moment: str, big: Big, out: Path) -> None:
    when, surely_unfinished = KILL_MOMENTS[moment]
    proc = start(*big.args(out))
    started = time.monotonic()
    code = kill_after(proc, lambda: when(big, out, started))
    if surely_unfinished:
        assert code == -signal.SIGKILL
    if code == -signal.SIGKILL and out.exists():
        if (out / "config.json").exists():      # written last: killed while cleaning up
            assert big.shards_done(out) == BIG_SHARDS
        else:                                   # visibly unfinished, and resumable
            assert (out / STATE).is_dir() or not any(out.iterdir())
    big.rerun_gives_reference(out)


def test_killed_run_leaves_folder_without_config_json(big: Big) -> None:
    names = set(os.listdir(big.unfinished))
    assert "config.json" not in names and STATE in names
    assert set(big.shards_done(big.unfinished)) < set(BIG_SHARDS)


def test_resume_keeps_completed_shards(big: Big, out: Path) -> None:
    kept = copy_unfinished(big, out)
    assert kept
    big.rerun_gives_reference(out)
    assert {n: ident(out / n) for n in kept} == kept


def _tamper_header(path: Path) -> None:
    """Replace the file by one of the same size whose header differs ("pt" -> "PT")."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    at = data.index(b'"format":"pt"', 8, 8 + header_len) + len(b'"format":"')
    data[at:at + 2] = b"PT"
    path.unlink()
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 4096)


@pytest.mark.parametrize("damage", [_tamper_header, _truncate], ids=["same-size-other-header", "truncated"])
def test_resume_redoes_a_completed_shard_that_does_not_match_the_plan(
        damage: Callable[[Path], None], big: Big, out: Path) -> None:
    kept = copy_unfinished(big, out)
    victim = out / BIG_SHARDS[0]
    damage(victim)
    damaged = ident(victim)
    big.rerun_gives_reference(out)
    assert ident(victim) != damaged
    others = {n: v for n, v in kept.items() if n != BIG_SHARDS[0]}
    assert {n: ident(out / n) for n in others} == others


@pytest.mark.parametrize("state", ["unfinished", "complete"])
def test_force_redoes_all_shards(state: str, big: Big, out: Path) -> None:
    if state == "unfinished":
        before = copy_unfinished(big, out)
    else:
        shutil.copytree(big.reference, out)
        before = {n: ident(out / n) for n in BIG_SHARDS}
    big.rerun_gives_reference(out, "--force")
    after = {n: ident(out / n) for n in before}
    assert all(after[n] != before[n] for n in before), (before, after)


def test_concurrent_run_on_same_output_is_refused(big: Big, out: Path) -> None:
    shutil.copytree(big.unfinished, out)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)     # the lock is the output folder's own
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(out, follow_links=False)
        line = error_line(cli(*big.args(out), via="python"))
        assert_words(line, [str(out), "another", "run"])
        assert snapshot(out, follow_links=False) == before
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Output safety with an unfinished run: symlinks planted inside OUTPUT are never followed
# ---------------------------------------------------------------------------------------------

def _next_partial(big: Big, out: Path) -> str:
    todo = [n for n in BIG_SHARDS if not (out / n).exists()]
    return f".{todo[0]}.partial"


PLANTED: dict[str, Callable[[Big, Path], str]] = {
    "partial-of-next-shard": _next_partial,
    "config.json": lambda big, out: "config.json",
    "unwritten-shard": lambda big, out: BIG_SHARDS[-1],
    "other-file": lambda big, out: "tokenizer.json",
    "other-file-subfolder": lambda big, out: "inference",
}


@pytest.mark.parametrize("where", list(PLANTED))
def test_symlink_planted_in_output_is_not_followed(where: str, big: Big, out: Path, tmp_path: Path) -> None:
    copy_unfinished(big, out)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"not yours\n" * 1000)
    name = PLANTED[where](big, out)
    target = outside if where == "other-file-subfolder" else outside / "precious.bin"
    if os.path.lexists(out / name):         # the killed run's stale partial: replaced by the link
        os.unlink(out / name)
    (out / name).symlink_to(target)
    before = snapshot(outside, follow_links=False)
    result = cli(*big.args(out), via="python", timeout=120)
    assert snapshot(outside, follow_links=False) == before
    if result.returncode == 0:
        assert not (out / name).is_symlink()
        assert snapshot(out, follow_links=False) == big.reference_tree
    else:                           # refusing is fine too, if it says why in one line
        assert_words(error_line(result), [name])


# ---------------------------------------------------------------------------------------------
# 4. Disk space
# ---------------------------------------------------------------------------------------------

UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}


def amounts(line: str) -> list[float]:
    return [float(n) * UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*(B|[kK]B|MB|GB|KiB|MiB|GiB)\b", line)]


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 32 MB ext4 filesystem (~26 MB free) mounted at tmp_path/mnt; skips if mounting is not
    allowed here."""
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    try:
        subprocess.run(["mkfs.ext4", "-q", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot loop-mount a small ext4 filesystem here: {getattr(e, 'stderr', '') or e}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_not_enough_disk_space_is_refused_before_writing(big: Big, small_fs: Path) -> None:
    out = small_fs / "DeepSeek-big-Block64x64"
    before = snapshot(small_fs, follow_links=False)
    free = shutil.disk_usage(small_fs).free
    need = sum(os.path.getsize(p) for p in big.reference.rglob("*") if p.is_file())
    assert need > free
    line = error_line(cli(*big.args(out), via="python"))
    assert_words(line, ["free"])
    found = amounts(line)
    assert any(abs(a - need) <= 0.01 * need for a in found), f"needed {need} B not in: {line}"
    assert any(abs(a - free) <= 0.05 * free for a in found), f"free {free} B not in: {line}"
    assert not out.exists()
    assert snapshot(small_fs, follow_links=False) == before
    assert snapshot(big.input, follow_links=False) == big.input_tree


def test_disk_full_during_run_fails_cleanly_and_rerun_completes(big: Big, out: Path) -> None:
    sizes = [os.path.getsize(big.reference / n) for n in BIG_SHARDS]
    limit = (sizes[0] + sizes[1]) // 2              # shard 1 fits, shard 2 does not
    assert min(sizes) < limit < max(sizes)
    line = error_line(cli(*big.args(out), via="python", timeout=120, before=limit_file_size(limit)))
    assert_words(line, [BIG_SHARDS[1], "re-run"])
    assert any(w in line for w in ("ulimit", "too large", "disk full", "file size")), line
    assert no_partials(out) == []
    assert big.shards_done(out) == BIG_SHARDS[:1]
    assert not (out / "config.json").exists()
    big.rerun_gives_reference(out)


def test_a_scale_that_reads_back_wrong_stops_the_run_before_its_shard_is_renamed(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    out = tmp_path / "out"

    def corrupt_scale_writes() -> None:
        real = rbs._pwrite_all

        def write(fd: int, data, offset: int) -> None:
            # Only resized scales are written as bytes past offset 0 (headers start at 0, copies
            # go through other calls): flip the first byte of each, as a failing disk might.
            if isinstance(data, bytes) and offset > 0 and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            real(fd, data, offset)
        rbs._pwrite_all = write
    result = cli(model, "-o", out, "-q", before=corrupt_scale_writes, via="fork")
    line = error_line(result)
    assert "read back differs" in line and "_scale_inv" in line, line
    assert not (out / SHARD1).exists() and not (out / SHARD2).exists()
    assert no_partials(out) == []


# ---------------------------------------------------------------------------------------------
# 5. Signals
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, moment", [
    (signal.SIGINT, "first-partial-file"),
    (signal.SIGTERM, "after-2-shards"),
], ids=["SIGINT-while-writing-shard-1", "SIGTERM-after-2-shards"])
def test_signal_stops_cleanly_and_rerun_completes(sig: signal.Signals, moment: str, big: Big, out: Path) -> None:
    # Without -q: the progress bar is on stderr, as for a person pressing Ctrl-C.
    proc = start(*[a for a in big.args(out) if a != "-q"])
    if moment == "first-partial-file":
        ready = wait_until(proc, lambda: bool(no_partials(out)))
    else:
        ready = wait_until(proc, lambda: len(big.shards_done(out)) >= 2)
    assert ready, "the run ended before the signal could be sent"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    # SIGINT: 130 like any shell tool; SIGTERM may report 130 too or the conventional 143.
    assert proc.returncode in ((130,) if sig == signal.SIGINT else (130, 143)), stderr
    assert "Traceback" not in stderr, stderr
    assert any("re-run" in line and "resume" in line for line in stderr.splitlines()), stderr
    assert not (out / "config.json").exists()
    big.rerun_gives_reference(out)


def _signal_self_when_opening(suffix: str, sig: signal.Signals) -> Callable[[], None]:
    """before(): make the child receive `sig` the moment it creates a file ending in `suffix`,
    as a Ctrl-C that lands while the kernel is creating it would."""
    def install() -> None:
        real_open = os.open

        def open_then_signal(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            if os.fspath(path).endswith(suffix):
                os.kill(os.getpid(), sig)      # delivered as this call returns
            return fd
        os.open = open_then_signal
    return install


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_as_a_partial_file_is_created_leaves_no_partial(sig: signal.Signals, tmp_path: Path) -> None:
    """The race the end-to-end test above hits now and then, made deterministic."""
    model = write_hand_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    result = cli(model, "-o", out, "-q", before=_signal_self_when_opening(f"{SHARD2}.partial", sig), via="fork")
    assert result.returncode in (130, 143), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert (out / SHARD1).is_file()
    assert no_partials(out) == []
