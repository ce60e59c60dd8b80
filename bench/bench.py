"""Benchmark resize_block_size.py against `cp -r` and a naive load/save converter.

What it measures
  On the filesystem of --workdir (ext4 here), for each shard size in --shard-gb:
    * the wall time of three commands, each run as a child process on a fresh output folder and
      followed by sync (inside the timed wall):
          tool   resize-block-size IN -o OUT --quiet   (see `tool_argv`: the installed command)
          cp     cp -r --reflink=never IN OUT
          naive  python bench/naive_convert.py IN OUT   (load_file, repeat_interleave, save_file)
      one warm-up run of each, then --pairs rounds in alternating order (tool cp naive,
      naive cp tool, ...); the table shows median walls and the medians of per-round ratios;
    * the peak RSS of each command, read with os.wait4 by a tiny wrapper process (see MEASURE);
    * that the tool's output holds the same tensors as the naive converter's (warm-up outputs).
  On XFS (a loop-mounted image; needs root and mkfs.xfs; --xfs, or automatically if possible):
    * the tool (reflink, its default) against cp -r --reflink=never: wall times and their ratio,
      the extra disk the output takes (statvfs free space before and after, after sync) as % of
      the input, and the bytes it shares with the input (FIEMAP extents flagged SHARED) as % of
      the unchanged (FP8 weight) bytes, next to what the tool's own summary says it shared.

The checkpoint is DeepSeek-V3 shaped: MoE experts whose gate/up/down_proj weights are FP8
[2048, 7168] / [7168, 2048] (random bytes 0..126: finite, no NaN pattern) with F32 128x128
block scales [16, 56] / [56, 16], plus config.json and the index. --layout sorted writes each
shard with safetensors' save_file, which puts the scales first as in real checkpoints;
--layout interleaved writes weight, scale, weight, scale ... by hand, so the unchanged runs
between scales are not at block-aligned offsets in the output.

At most the input and two outputs exist at once; everything created (work folder, loop mount,
image) is removed at the end, also on Ctrl-C or SIGTERM. The report is markdown on stdout,
progress goes to stderr:

    python bench/bench.py --quick                      # ~1 GB smoke run, 1 pair
    python bench/bench.py | tee bench/RESULTS.md       # 6 GB, shards 0.5 and 4 GB, 3 pairs, + XFS
    python bench/bench.py --layout interleaved --pairs 5 --no-xfs

Needs torch and safetensors (to build the checkpoint and for the naive baseline; both are in the
project's test extra: pip install '.[test]'), GNU cp, and for the XFS part root and xfsprogs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import py_compile
import re
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

BENCH_DIR = Path(__file__).resolve().parent
TOOL = BENCH_DIR.parent / "resize_block_size.py"
NAIVE = BENCH_DIR / "naive_convert.py"

GB = 1e9
MB = 1e6
SCALE_SUFFIX = "_scale_inv"
SOURCE_BLOCK = 128
# DeepSeek-V3: hidden 7168, MoE intermediate 2048, 256 routed experts per layer from layer 3 on.
PROJECTIONS = {"gate_proj": (2048, 7168), "up_proj": (2048, 7168), "down_proj": (7168, 2048)}
FIRST_MOE_LAYER, EXPERTS_PER_LAYER = 3, 256
WEIGHT_BYTES_PER_EXPERT = sum(n * k for n, k in PROJECTIONS.values())
EXPERT_BYTES = WEIGHT_BYTES_PER_EXPERT + sum(
    4 * math.ceil(n / SOURCE_BLOCK) * math.ceil(k / SOURCE_BLOCK) for n, k in PROJECTIONS.values())
SAFETENSORS_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32"}

TARGETS = {"tool/cp": 1.0, "naive/tool": 1.6, "tool_rss_mb": 300, "rss_spread": 0.10,
           "xfs_shared": 0.99, "xfs_extra_disk": 0.01, "xfs_wall_ratio": 0.05}


# ---------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------

def expert_prefixes(count: int) -> list[str]:
    return [f"model.layers.{FIRST_MOE_LAYER + i // EXPERTS_PER_LAYER}.mlp.experts.{i % EXPERTS_PER_LAYER}"
            for i in range(count)]


def shard_groups(size_bytes: float, shard_bytes: float) -> list[list[str]]:
    """Experts of the checkpoint, packed into shards of at most `shard_bytes` (one expert at least)."""
    experts = expert_prefixes(max(1, round(size_bytes / EXPERT_BYTES)))
    per_shard = max(1, int(shard_bytes // EXPERT_BYTES))
    return [experts[i: i + per_shard] for i in range(0, len(experts), per_shard)]


def expert_tensors(prefix: str) -> dict[str, torch.Tensor]:
    """One expert's FP8 weights and F32 scales, each weight followed by its scale."""
    tensors = {}
    for proj, (n, k) in PROJECTIONS.items():
        name = f"{prefix}.{proj}.weight"
        tensors[name] = torch.randint(0, 0x7F, (n, k), dtype=torch.uint8).view(torch.float8_e4m3fn)
        grid = (math.ceil(n / SOURCE_BLOCK), math.ceil(k / SOURCE_BLOCK))
        tensors[name + SCALE_SUFFIX] = torch.rand(grid) * 1e-3 + 1e-5
    return tensors


def write_sorted(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors' own layout: tensors sorted by dtype then name, so every scale comes first."""
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_interleaved(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written by hand with the data in dict order: weight, scale, weight, ..."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        entries[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().data)


WRITERS = {"sorted": write_sorted, "interleaved": write_interleaved}


def deepseek_config() -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_size": 7168, "moe_intermediate_size": 2048, "n_routed_experts": EXPERTS_PER_LAYER,
        "first_k_dense_replace": FIRST_MOE_LAYER, "num_hidden_layers": 61, "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [SOURCE_BLOCK, SOURCE_BLOCK]},
    }


def build_checkpoint(folder: Path, groups: list[list[str]], layout: str) -> None:
    """Write the shards, model.safetensors.index.json and config.json into a new `folder`."""
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: t for prefix in group for name, t in expert_tensors(prefix).items()}
        WRITERS[layout](folder / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(deepseek_config(), indent=2) + "\n")


@dataclass
class Checkpoint:
    path: Path
    shards: int
    shard_bytes: int          # the largest shard
    total_bytes: int          # every file
    unchanged_bytes: int      # FP8 weight bytes: what the tool copies or shares untouched

    def describe(self) -> str:
        return f"{self.shards} x {self.shard_bytes / GB:.2f} GB"


def make_checkpoint(folder: Path, size_gb: float, shard_gb: float, layout: str) -> Checkpoint:
    """Build the checkpoint in a child process, so the parent never holds a shard in memory."""
    groups = shard_groups(size_gb * GB, shard_gb * GB)
    log(f"building {size_gb:g} GB checkpoint, {len(groups)} shards ({layout}) in {folder}")
    run_in_child(build_checkpoint, folder, groups, layout)
    files = [p for p in folder.iterdir() if p.is_file()]
    return Checkpoint(folder, len(groups),
                      max(p.stat().st_size for p in files if p.suffix == ".safetensors"),
                      sum(p.stat().st_size for p in files),
                      sum(len(g) for g in groups) * WEIGHT_BYTES_PER_EXPERT)


def run_in_child(fn: Callable, *args: object) -> None:
    child = multiprocessing.get_context("spawn").Process(target=fn, args=args)
    child.start()
    try:
        child.join()
    finally:
        if child.is_alive():
            child.terminate()
            child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit code {child.exitcode})")


# ---------------------------------------------------------------------------------------------
# Running one command: wall time including sync, peak RSS of that command
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    wall: float               # seconds, including the sync after it
    rss: int                  # peak RSS of the command, bytes
    extra_disk: int           # free space the output took, bytes (after sync)
    stdout: str
    details: dict = field(default_factory=dict)


# The measured command runs under this tiny wrapper, which times it and reads its peak RSS with
# os.wait4. The wrapper is needed because Linux starts an exec'd child's ru_maxrss at the RSS
# high-water mark of the process it was forked from: waiting on a child of this (big) process
# would report this process's peak, not the command's. The wrapper itself stays ~10 MB.
MARKER = "@@bench-measure"
MEASURE = f"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)        # the command gets Ctrl-C itself: wait for it
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, setsigdef=[signal.SIGINT])
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
_, status, usage = os.wait4(pid, 0)
print(f"\\n{MARKER} {{time.perf_counter() - start}} {{usage.ru_maxrss}} {{os.waitstatus_to_exitcode(status)}}")
"""


def spawn_measured(argv: list[str]) -> tuple[float, int, str]:
    """Run `argv` as a child, then sync; (wall seconds incl. sync, the command's peak RSS, stdout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        wrapper = subprocess.Popen([sys.executable, "-S", "-c", MEASURE, *argv], stdout=out, stderr=err)
        try:
            wrapper.wait()
        except BaseException:
            stop_child(wrapper)
            raise
        start = time.perf_counter()
        os.sync()
        sync = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    stdout, _, measured = stdout.rpartition(f"\n{MARKER} ")
    if wrapper.returncode != 0 or not measured:
        raise RuntimeError(f"measuring {shlex.join(argv)} failed:\n{stderr[-2000:]}")
    wall, rss_kib, code = measured.split()
    if code != "0":
        raise RuntimeError(f"{shlex.join(argv)} exited with {code}:\n{stderr[-2000:]}")
    return float(wall) + sync, int(rss_kib) * 1024, stdout


def stop_child(child: subprocess.Popen) -> None:
    """SIGTERM (the tool then removes its partial file), SIGKILL if it does not exit soon."""
    child.terminate()
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def settled_free_bytes(path: Path) -> int:
    """Free space after sync, once it stops changing: XFS frees deleted files in the background,
    a moment after unlink and sync return."""
    readings = [free_bytes(path)]
    for _ in range(50):
        os.sync()
        time.sleep(0.2)
        readings.append(free_bytes(path))
        if readings[-3:] == [readings[-1]] * 3:
            break
    return readings[-1]


def timed_run(argv: list[str], out: Path, inspect: Callable[[Path], dict] | None = None) -> Run:
    """One measured run into a fresh `out`, which is removed afterwards."""
    remove(out)
    before = settled_free_bytes(out.parent)
    wall, rss, stdout = spawn_measured(argv)
    run = Run(wall, rss, before - settled_free_bytes(out.parent), stdout)
    if inspect:
        run.details = inspect(out)
    remove(out)
    os.sync()
    return run


Commands = dict[str, list[str]]


def paired_rounds(commands: Commands, out: Path, pairs: int,
                  inspect: Callable[[str, Path], dict] | None = None) -> dict[str, list[Run]]:
    """One warm-up run of each command, then `pairs` rounds in alternating order; warm-ups dropped."""
    names = list(commands)

    def one(name: str, label: str) -> Run:
        log(f"  {label:8} {name}")
        return timed_run(commands[name], out, inspect and (lambda o: inspect(name, o)))

    for name in names:
        one(name, "warm-up")
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for i in range(pairs):
        for name in names if i % 2 == 0 else names[::-1]:
            runs[name].append(one(name, f"round {i + 1}"))
            log(f"           {runs[name][-1].wall:.2f} s, {runs[name][-1].rss / MB:.0f} MB")
    return runs


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def install_tool(tool: Path) -> None:
    """Byte-compile the module copy, as `pip install` does, so that it runs like the installed
    `resize-block-size` command: `python resize_block_size.py` would recompile ~2000 lines on
    every start (15 ms, a tenth of a copy-on-write conversion of this checkpoint)."""
    py_compile.compile(str(tool), cfile=importlib.util.cache_from_source(str(tool)), doraise=True)


def tool_argv(setup: Setup, inp: Path, out: Path, quiet: bool = True) -> list[str]:
    """The console script's entry point (pyproject.toml), on the module copy `setup.tool`."""
    tool = setup.tool
    entry = f"import sys; sys.path.insert(0, {str(tool.parent)!r}); from {tool.stem} import main_exit; main_exit()"
    return [sys.executable, "-c", entry, str(inp), "-o", str(out), *setup.tool_args] + (["--quiet"] if quiet else [])


def cp_argv(inp: Path, out: Path) -> list[str]:
    return ["cp", "-r", "--reflink=never", str(inp), str(out)]


def naive_argv(inp: Path, out: Path) -> list[str]:
    return [sys.executable, str(NAIVE), str(inp), str(out)]


# ---------------------------------------------------------------------------------------------
# Checking the tool's output against the naive converter's
# ---------------------------------------------------------------------------------------------

def compare_outputs(a: Path, b: Path) -> str:
    """'identical' if both folders hold the same tensors (names, dtypes, shapes, bytes) and block."""
    block = [json.loads((d / "config.json").read_text())["quantization_config"]["weight_block_size"]
             for d in (a, b)]
    if block[0] != block[1]:
        return f"config.json weight_block_size differs: {block[0]} vs {block[1]}"
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    if shards != sorted(p.name for p in b.glob("*.safetensors")):
        return "different shard files"
    for shard in shards:
        with safe_open(a / shard, framework="pt") as fa, safe_open(b / shard, framework="pt") as fb:
            if set(fa.keys()) != set(fb.keys()):
                return f"{shard}: different tensor names"
            for name in fa.keys():
                ta, tb = fa.get_tensor(name), fb.get_tensor(name)
                if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(
                        ta.contiguous().view(torch.uint8), tb.contiguous().view(torch.uint8)):
                    return f"{shard}: {name} differs ({ta.dtype} {list(ta.shape)} vs {tb.dtype} {list(tb.shape)})"
    return "identical"


class OutputCheck:
    """An `inspect` hook: keeps the tool's first output, compares the naive one's with it."""

    def __init__(self, keep: Path):
        self.keep = keep
        self.result = "not run"

    def __call__(self, name: str, out: Path) -> dict:
        if name == "tool" and not self.keep.exists() and self.result == "not run":
            out.rename(self.keep)
        elif name == "naive" and self.keep.exists():
            self.result = compare_outputs(self.keep, out)
            log(f"  tool output vs naive output: {self.result}")
            remove(self.keep)
        return {}


# ---------------------------------------------------------------------------------------------
# ext4 (the work folder's filesystem): tool vs cp vs naive
# ---------------------------------------------------------------------------------------------

@dataclass
class SpeedRow:
    checkpoint: str
    runs: dict[str, list[Run]]
    check: str

    def wall(self, name: str) -> float:
        return statistics.median(r.wall for r in self.runs[name])

    def ratio(self, a: str, b: str) -> float:
        return statistics.median(x.wall / y.wall for x, y in zip(self.runs[a], self.runs[b]))

    def rss(self, name: str) -> float:
        return max(r.rss for r in self.runs[name])


@dataclass
class Setup:
    """What every measurement shares."""
    size_gb: float
    layout: str
    pairs: int
    tool: Path
    tool_args: list[str] = field(default_factory=list)     # --tool-args, e.g. ["--workers", "2"]


def bench_speed(work: Path, setup: Setup, shard_gb: float) -> SpeedRow:
    ckpt = make_checkpoint(work / "in", setup.size_gb, shard_gb, setup.layout)
    out = work / "out"
    check = OutputCheck(work / "tool-output")
    try:
        commands = {"tool": tool_argv(setup, ckpt.path, out), "cp": cp_argv(ckpt.path, out),
                    "naive": naive_argv(ckpt.path, out)}
        runs = paired_rounds(commands, out, setup.pairs, check)
    finally:
        remove(check.keep)
        remove(ckpt.path)
    return SpeedRow(ckpt.describe(), runs, check.result)


# ---------------------------------------------------------------------------------------------
# XFS on a loop device: reflink vs a real copy
# ---------------------------------------------------------------------------------------------

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
FIEMAP_HEAD = struct.Struct("=QQIIII")          # struct fiemap, without fm_extents[]
FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")     # struct fiemap_extent
EXTENTS_PER_CALL = 256


def file_shared_bytes(path: Path) -> int:
    """Bytes of `path` in extents the filesystem reports as shared with another file."""
    size = path.stat().st_size
    shared = counted = 0
    with open(path, "rb") as f:
        while counted < size:
            buf = bytearray(FIEMAP_HEAD.pack(counted, size - counted, FIEMAP_FLAG_SYNC, 0, EXTENTS_PER_CALL, 0))
            buf += bytes(FIEMAP_EXTENT.size * EXTENTS_PER_CALL)
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
            mapped = FIEMAP_HEAD.unpack_from(buf)[3]
            if not mapped:
                break
            for i in range(mapped):
                logical, _, length, _, _, flags, *_ = FIEMAP_EXTENT.unpack_from(
                    buf, FIEMAP_HEAD.size + i * FIEMAP_EXTENT.size)
                end = min(logical + length, size)
                if flags & FIEMAP_EXTENT_SHARED:
                    shared += max(0, end - max(logical, counted))
                counted = max(counted, end)
                if flags & FIEMAP_EXTENT_LAST:
                    return shared
    return shared


def tree_shared_bytes(folder: Path) -> int:
    return sum(file_shared_bytes(Path(root) / f) for root, _, files in os.walk(folder) for f in files)


def xfs_unavailable() -> str | None:
    """Why an XFS loop mount cannot be made here, or None."""
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("mkfs.xfs"):
        return "mkfs.xfs not installed (apt-get install -y xfsprogs)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices"
    return None


@contextlib.contextmanager
def xfs_mount(work: Path, size_bytes: int) -> Iterator[Path]:
    """A fresh XFS filesystem (reflink on) in a sparse image under `work`, mounted on a loop device."""
    image, mount_point = work / "xfs.img", work / "xfs"
    mount_point.mkdir()
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size_bytes)
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True, capture_output=True)
        mounted = True
        yield mount_point
    finally:
        with signals_blocked():
            if mounted:
                unmount(mount_point)
            image.unlink(missing_ok=True)
            mount_point.rmdir()


def unmount(mount_point: Path) -> None:
    """umount (which also frees the loop device), retrying while busy; lazily as a last resort."""
    for _ in range(10):
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


@dataclass
class XfsRow:
    checkpoint: str
    input_bytes: int
    unchanged_bytes: int
    runs: dict[str, list[Run]]

    def wall(self, name: str) -> float:
        return statistics.median(r.wall for r in self.runs[name])

    def ratio(self) -> float:
        return statistics.median(t.wall / c.wall for t, c in zip(self.runs["tool"], self.runs["cp"]))

    def extra_disk(self, name: str) -> float:
        return max(r.extra_disk for r in self.runs[name]) / self.input_bytes

    def shared_bytes(self, name: str) -> int:
        return min(r.details["shared"] for r in self.runs[name])

    def shared(self, name: str) -> float:
        return self.shared_bytes(name) / self.unchanged_bytes

    def tool_says_shared(self) -> str:
        """What the tool's summary line says it shared, e.g. '5.9 GB'."""
        found = re.search(r"\(([\d.]+ [kMG]?B) shared", self.runs["tool"][-1].stdout)
        return found.group(1) if found else "?"


def bench_xfs(mount_point: Path, setup: Setup, shard_gb: float) -> XfsRow:
    ckpt = make_checkpoint(mount_point / "in", setup.size_gb, shard_gb, setup.layout)
    out = mount_point / "out"
    try:
        commands = {"tool": tool_argv(setup, ckpt.path, out, quiet=False), "cp": cp_argv(ckpt.path, out)}
        runs = paired_rounds(commands, out, setup.pairs, lambda name, o: {"shared": tree_shared_bytes(o)})
    finally:
        remove(ckpt.path)
        os.sync()
    return XfsRow(ckpt.describe(), ckpt.total_bytes, ckpt.unchanged_bytes, runs)


# ---------------------------------------------------------------------------------------------
# Report (markdown on stdout)
# ---------------------------------------------------------------------------------------------

def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def speed_report(rows: list[SpeedRow]) -> str:
    table = md_table(
        ["shards", "tool s", "cp s", "naive s", "tool/cp", "naive/tool", "tool RSS MB", "naive RSS MB",
         "tool output = naive output"],
        [[r.checkpoint, f"{r.wall('tool'):.2f}", f"{r.wall('cp'):.2f}", f"{r.wall('naive'):.2f}",
          f"{r.ratio('tool', 'cp'):.3f}", f"{r.ratio('naive', 'tool'):.2f}",
          f"{r.rss('tool') / MB:.0f}", f"{r.rss('naive') / MB:.0f}", r.check] for r in rows])
    rss = [r.rss("tool") for r in rows]
    spread = (max(rss) - min(rss)) / min(rss)
    checks = [
        *(f"- tool/cp <= {TARGETS['tool/cp']} ({r.checkpoint}): {r.ratio('tool', 'cp'):.3f} "
          f"{verdict(r.ratio('tool', 'cp') <= TARGETS['tool/cp'])}" for r in rows),
        *(f"- naive/tool >= {TARGETS['naive/tool']} ({r.checkpoint}): {r.ratio('naive', 'tool'):.2f} "
          f"{verdict(r.ratio('naive', 'tool') >= TARGETS['naive/tool'])}" for r in rows),
        f"- tool peak RSS <= {TARGETS['tool_rss_mb']} MB: max {max(rss) / MB:.0f} MB "
        f"{verdict(max(rss) <= TARGETS['tool_rss_mb'] * MB)}",
        f"- tool peak RSS within {TARGETS['rss_spread']:.0%} across shard sizes: spread {spread:.1%} "
        f"{verdict(spread <= TARGETS['rss_spread'])}",
    ]
    return "\n".join([table, "", *checks, "", runs_report(rows)])


def xfs_report(rows: list[XfsRow]) -> str:
    table = md_table(
        ["shards", "tool s (reflink)", "cp s", "tool/cp", "tool extra disk % of input",
         "tool shared (FIEMAP), % of unchanged bytes", "tool summary: shared", "cp extra disk %", "cp shared %"],
        [[r.checkpoint, f"{r.wall('tool'):.2f}", f"{r.wall('cp'):.2f}", f"{r.ratio():.1%}",
          f"{r.extra_disk('tool'):.2%}", f"{r.shared_bytes('tool') / GB:.3f} GB = {r.shared('tool'):.2%}",
          r.tool_says_shared(),
          f"{r.extra_disk('cp'):.1%}", f"{r.shared('cp'):.1%}"] for r in rows])
    checks = []
    for r in rows:
        checks += [
            f"- shared >= {TARGETS['xfs_shared']:.0%} of unchanged bytes ({r.checkpoint}): "
            f"{r.shared('tool'):.2%} {verdict(r.shared('tool') >= TARGETS['xfs_shared'])}",
            f"- extra disk < {TARGETS['xfs_extra_disk']:.0%} of input ({r.checkpoint}): "
            f"{r.extra_disk('tool'):.2%} {verdict(r.extra_disk('tool') < TARGETS['xfs_extra_disk'])}",
            f"- wall < {TARGETS['xfs_wall_ratio']:.0%} of cp ({r.checkpoint}): "
            f"{r.ratio():.1%} {verdict(r.ratio() < TARGETS['xfs_wall_ratio'])}",
        ]
    return "\n".join([table, "", *checks, "", runs_report(rows)])


def runs_report(rows: list[SpeedRow] | list[XfsRow]) -> str:
    lines = ["<details><summary>every timed run (s, peak RSS MB)</summary>", ""]
    for r in rows:
        for name, runs in r.runs.items():
            lines.append(f"- {r.checkpoint} {name}: " + ", ".join(f"{x.wall:.2f} s/{x.rss / MB:.0f} MB" for x in runs))
    return "\n".join(lines + ["", "</details>"])


def fs_type(path: Path) -> str:
    found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True, text=True)
    return found.stdout.strip() or "?"


def git_revision(path: Path) -> str:
    """The commit of the repository `path` is in, with '+changes' if the file differs from it."""
    folder = path.resolve().parent
    head = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return "none"
    dirty = subprocess.run(["git", "-C", str(folder), "diff", "--quiet", "HEAD", "--", path.name], capture_output=True)
    return head.stdout.strip() + ("+changes" if dirty.returncode else "")


def machine_facts(work: Path) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cp_version = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return (f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n"
            f"- machine: nproc {os.cpu_count()}, RAM {mem / GB:.0f} GB, kernel {platform.release()}, "
            f"work folder {work.parent} on {fs_type(work)}\n"
            f"- python {platform.python_version()}, torch {torch.__version__}, {cp_version}\n"
            f"- load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
            "(other processes share the 2 cores; pairs alternate to spread their effect)")


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Let cleanup finish: Ctrl-C/SIGTERM during it are delivered afterwards."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def work_folder(parent: Path | None) -> Iterator[Path]:
    """A new folder under `parent` (default /tmp), removed with all it holds at the end."""
    path = Path(tempfile.mkdtemp(prefix="bench-resize-", dir=parent))
    try:
        yield path
    finally:
        with signals_blocked():
            shutil.rmtree(path, ignore_errors=True)


def check_disk(work: Path, size_gb: float, max_disk_gb: float) -> None:
    """Input plus two outputs must fit in the budget and in the free space."""
    need = 3 * size_gb * GB
    if need > max_disk_gb * GB:
        raise SystemExit(f"--size-gb {size_gb:g} needs up to {need / GB:.0f} GB (input + 2 outputs), "
                         f"more than --max-disk-gb {max_disk_gb:g}")
    if need + 2 * GB > free_bytes(work):
        raise SystemExit(f"{work} has {free_bytes(work) / GB:.0f} GB free, the benchmark needs {need / GB:.0f} GB")


def want_xfs(choice: str) -> bool:
    reason = xfs_unavailable()
    if choice == "yes" and reason:
        raise SystemExit(f"--xfs: cannot make an XFS loop mount: {reason}")
    if choice == "auto" and reason:
        log(f"XFS part skipped: {reason}")
    return choice != "no" and reason is None


def run(args: argparse.Namespace) -> str:
    """Every measurement the arguments ask for; returns the markdown report."""
    with work_folder(args.workdir) as work:
        check_disk(work, args.size_gb, args.max_disk_gb)
        # A snapshot, so that edits to the module during the run do not mix versions.
        tool = Path(shutil.copy(args.tool, work / "resize_block_size.py"))
        setup = Setup(args.size_gb, args.layout, args.pairs, tool, shlex.split(args.tool_args))
        install_tool(setup.tool)
        report = ["# resize_block_size.py benchmark\n",
                  f"- command: `{shlex.join(['python', *sys.argv])}`", machine_facts(work),
                  f"- tool: {args.tool.resolve()} (sha256 {hashlib.sha256(setup.tool.read_bytes()).hexdigest()[:12]}, "
                  f"copied at the start and byte-compiled, run as the console script; git {git_revision(args.tool)})",
                  f"- checkpoint: {args.size_gb:g} GB of DeepSeek-V3 expert tensors (FP8 + F32 128x128 scales), "
                  f"layout {args.layout}, converted to 64x64; {args.pairs} timed pairs after a warm-up; "
                  "each wall includes `sync`", ""]
        log(f"work folder {work}")
        speed = []
        for shard_gb in args.shard_gb:
            log(f"== {work.parent}: shards of {shard_gb:g} GB")
            speed.append(bench_speed(work, setup, shard_gb))
        report += [f"## Speed and memory ({fs_type(work)}; tool vs cp -r --reflink=never vs naive load/save)",
                   "", speed_report(speed), ""]
        if want_xfs(args.xfs):
            image = int(2.2 * args.size_gb * GB + 2 * GB)
            with xfs_mount(work, image) as mount_point:
                xfs = []
                for shard_gb in args.shard_gb:
                    log(f"== XFS: shards of {shard_gb:g} GB")
                    xfs.append(bench_xfs(mount_point, setup, shard_gb))
            report += [f"## XFS with reflink (loop image of {image / GB:.1f} GB; tool default vs "
                       "cp -r --reflink=never)", "", xfs_report(xfs), ""]
    return "\n".join(report)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=6.0, help="checkpoint size (default: 6)")
    p.add_argument("--shard-gb", type=float, nargs="+", default=[0.5, 4.0],
                   help="shard sizes to compare (default: 0.5 4)")
    p.add_argument("--pairs", type=int, default=3, help="timed rounds after the warm-up (default: 3)")
    p.add_argument("--layout", choices=sorted(WRITERS), default="sorted",
                   help="sorted: save_file, scales first (default); interleaved: weight, scale, ...")
    p.add_argument("--workdir", type=Path, help="where the temporary work folder goes (default: /tmp)")
    p.add_argument("--xfs", dest="xfs", action="store_const", const="yes", default="auto",
                   help="also measure on an XFS loop mount (default: when root with mkfs.xfs)")
    p.add_argument("--no-xfs", dest="xfs", action="store_const", const="no", help="skip the XFS part")
    p.add_argument("--max-disk-gb", type=float, default=25.0,
                   help="refuse sizes whose input + 2 outputs exceed this (default: 25)")
    p.add_argument("--tool", type=Path, default=TOOL,
                   help="the resize_block_size.py to measure (default: the one next to bench/)")
    p.add_argument("--tool-args", default="", metavar="ARGS",
                   help='extra options for the tool, e.g. --tool-args="--workers 2"')
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 GB, shards of 0.25 and 1 GB, 1 pair")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.size_gb, args.shard_gb, args.pairs = 1.0, [0.25, 1.0], 1
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        print(run(args))
    except KeyboardInterrupt:
        log("interrupted; everything the benchmark created was removed")
        sys.exit(130)


if __name__ == "__main__":
    main()
