"""--in-place and --restore, checked against what a user can observe from outside.

* An in-place conversion must leave exactly the tensors, config.json and index a conversion to a
  separate folder writes; --restore must give back every file byte for byte (sha256 of every file
  below the folder, the state folder included: after a restore there must be none).
* Its promises under failure: kill -9 at any moment, then the same command again, ends with the
  same bytes as a run that was never interrupted (and --restore after a killed conversion, or
  after a killed restore, ends with the original files); a full disk stops it with one line, the
  shard it was replacing intact and no `.NAME.partial` left; the extra disk it takes is one shard.
* Going back with --block-size 128 only works when every scale is a replication.

Every expectation is computed here (dequantized values, shard sizes, sha256 of the originals,
an uninterrupted run on a copy), never read from the tool's own plan. Starting a new Python
dominates the runtime, so runs that must be real processes (kill -9, ulimit, the
main round trip, the disk measurement) start several at once, and refusals, dry runs and the
round-trip variants run in a forked child of this process (conftest's `cli()`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import cli, deepseek, dequantized, finish, load_all, snapshot, start, tc

STATE = ".resize_block_size"     # INPUT/.resize_block_size/: the record of an in-place run
LOCK = f"{STATE}/lock"          # holds the pid of the last run that took the lock: not checkpoint data
INDEX = "model.safetensors.index.json"
ERROR = "resize-block-size: error: "


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def run_together(*commands: tuple, before=None) -> list[subprocess.CompletedProcess]:
    """Run several command lines at once (each a tuple of arguments, each in its own process) and
    wait for all."""
    return [finish(p) for p in [start(*c, before=before) for c in commands]]


def show(r: subprocess.CompletedProcess) -> str:
    return f"{' '.join(map(str, r.args))}: exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"


def assert_ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, show(r)


def assert_one_line_error(r: subprocess.CompletedProcess) -> str:
    """Exit non-zero with exactly one line on stderr, `resize-block-size: error: ...`; returns it."""
    assert r.returncode != 0, show(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), show(r)
    assert "Traceback" not in r.stderr, show(r)
    return lines[0]


def without_lock(snap: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in snap.items() if k != LOCK}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def shard_contents(folder: Path) -> dict[str, dict[str, tuple[str, tuple, bytes]]]:
    """shard -> tensor -> (dtype, shape, raw bytes), read with the safetensors library."""
    out = {}
    for name in shard_names(folder):
        with safe_open(folder / name, framework="pt") as f:
            out[name] = {}
            for t in f.keys():
                x = f.get_tensor(t).contiguous()
                out[name][t] = (str(x.dtype), tuple(x.shape), x.view(torch.uint8).numpy().tobytes())
    return out


def decimal(n: int) -> str:
    """Bytes as the dry-run prints them: decimal units, one digit."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def is_replication(scale: torch.Tensor, factor: tuple[int, int]) -> bool:
    """True if `scale` is every (factor)-th element repeated factor times (edge blocks trimmed)."""
    small = scale[..., :: factor[0], :: factor[1]]
    grown = small.repeat_interleave(factor[0], dim=-2).repeat_interleave(factor[1], dim=-1)
    return torch.equal(grown[..., : scale.shape[-2], : scale.shape[-1]], scale)


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints: in place then restore, for several variants at once
# ---------------------------------------------------------------------------------------------

def single_file_checkpoint(folder: Path) -> Path:
    return tc.write_checkpoint(folder, tc.deepseek_v3_tensors(), tc.deepseek_v3_config(),
                               single_file=True, extra_files=tc.default_extra_files())


# name -> (builder, target block, extra arguments of the in-place run). The first runs as a user
# would (new processes); the variants call main() in this process, meanwhile.
ROUND_TRIPS: dict[str, tuple[Callable[[Path], Path], tuple[int, int], tuple]] = {
    "64x64": (deepseek, (64, 64), ()),
    "32x32": (deepseek, (32, 32), ("--block-size", "32")),
    "single file": (single_file_checkpoint, (64, 64), ()),
    "bf16 scales": (lambda d: deepseek(d, scale_dtype=torch.bfloat16), (64, 64), ()),
}


@dataclass
class RoundTrip:
    folder: Path
    block: tuple[int, int]
    original: dict[str, str]                      # snapshot before anything
    original_values: dict[str, torch.Tensor]      # dequantized FP8 weights before anything
    original_tensors: dict[str, torch.Tensor]
    in_place: subprocess.CompletedProcess
    converted: dict[str, str]                     # snapshot after --in-place
    converted_values: dict[str, torch.Tensor]
    converted_tensors: dict[str, torch.Tensor]
    converted_shards: dict
    converted_config: dict
    converted_index: dict | None
    restore: subprocess.CompletedProcess
    restored: dict[str, str]                      # snapshot after --restore
    separate: subprocess.CompletedProcess | None = None   # the same conversion to another folder
    separate_input: Path | None = None
    separate_folder: Path | None = None


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory) -> dict[str, RoundTrip]:
    """Every variant converted in place (all at once, with a conversion of a copy of the 64x64
    variant to a separate folder alongside), inspected, then restored (all at once)."""
    root = tmp_path_factory.mktemp("round_trips")
    folders = {name: build(root / name.replace(" ", "_") / "DeepSeek-V3")
               for name, (build, _, _) in ROUND_TRIPS.items()}
    before = {name: (snapshot(f), dequantized(f), load_all(f)) for name, f in folders.items()}
    separate_input = root / "separate" / "DeepSeek-V3"
    shutil.copytree(folders["64x64"], separate_input)
    separate_output = root / "separate" / "DeepSeek-V3-b64"

    commands = {name: (f, "--in-place", "-q", *ROUND_TRIPS[name][2]) for name, f in folders.items()}
    procs = [start(*commands["64x64"]), start(separate_input, "-o", separate_output, "-q")]
    in_place = {name: cli(*c) for name, c in commands.items() if name != "64x64"}
    in_place["64x64"], separate = map(finish, procs)
    after = {}
    for name, f in folders.items():
        index = json.loads((f / INDEX).read_text()) if (f / INDEX).exists() else None
        try:
            values = dequantized(f)
        except Exception as e:                    # reported by the tests, not here
            values = {"<error>": repr(e)}
        after[name] = (snapshot(f), values, load_all(f), shard_contents(f),
                       json.loads((f / "config.json").read_text()), index)
    proc = start(folders["64x64"], "--restore", "-q")
    restores = {name: cli(f, "--restore", "-q") for name, f in folders.items() if name != "64x64"}
    restores["64x64"] = finish(proc)
    trips = {}
    for name, f in folders.items():
        trips[name] = RoundTrip(f, ROUND_TRIPS[name][1], *before[name], in_place[name], *after[name],
                                restores[name], snapshot(f))
    trips["64x64"].separate = separate
    trips["64x64"].separate_input = separate_input
    trips["64x64"].separate_folder = separate_output
    return trips


def assert_converted_exactly(rt: RoundTrip) -> None:
    """After --in-place: config says the target block, every scale has the engine shape for it,
    keeps its dtype, and every FP8 weight dequantizes bit-identically; other tensors unchanged."""
    assert_ok(rt.in_place)
    assert rt.converted_config["quantization_config"]["weight_block_size"] == list(rt.block)
    assert set(rt.converted_tensors) == set(rt.original_tensors)
    for name, t in rt.original_tensors.items():
        new = rt.converted_tensors[name]
        assert new.dtype == t.dtype, name
        if name.endswith("_scale_inv"):
            w = rt.original_tensors[name[: -len("_scale_inv")]].shape
            assert tuple(new.shape) == (math.ceil(w[-2] / rt.block[0]), math.ceil(w[-1] / rt.block[1])), name
        else:
            assert torch.equal(new.view(torch.uint8), t.contiguous().view(torch.uint8)), name
    assert set(rt.converted_values) == set(rt.original_values)
    for name, v in rt.original_values.items():
        assert torch.equal(rt.converted_values[name].view(torch.int32), v.view(torch.int32)), name


def assert_restored_exactly(rt: RoundTrip) -> None:
    assert rt.converted != rt.original, "the in-place run changed nothing"
    assert_ok(rt.restore)
    assert rt.restored == rt.original     # every file, config.json and index included; no state left


def test_in_place_gives_the_same_tensors_as_a_conversion_to_a_separate_folder(round_trips):
    rt = round_trips["64x64"]
    assert_ok(rt.in_place)
    assert_ok(rt.separate)
    separate = shard_contents(rt.separate_folder)
    assert list(rt.converted_shards) == list(separate)
    for shard, tensors in separate.items():
        assert rt.converted_shards[shard].keys() == tensors.keys(), shard
        for name, (dtype, shape, raw) in tensors.items():
            assert rt.converted_shards[shard][name] == (dtype, shape, raw), f"{shard}: {name}"
    assert rt.converted_config == json.loads((rt.separate_folder / "config.json").read_text())
    assert rt.converted_index == json.loads((rt.separate_folder / INDEX).read_text())


def test_restore_gives_back_every_file_byte_for_byte(round_trips):
    rt = round_trips["64x64"]
    assert_converted_exactly(rt)
    assert_restored_exactly(rt)


def test_in_place_to_32x32_then_restore(round_trips):
    rt = round_trips["32x32"]
    assert_converted_exactly(rt)
    assert_restored_exactly(rt)


def test_single_file_checkpoint_in_place_then_restore(round_trips):
    rt = round_trips["single file"]
    assert rt.original_tensors and shard_names(rt.folder) == ["model.safetensors"]
    assert_converted_exactly(rt)
    assert_restored_exactly(rt)


def test_bf16_scales_in_place_then_restore(round_trips):
    rt = round_trips["bf16 scales"]
    assert all(t.dtype == torch.bfloat16 for n, t in rt.original_tensors.items() if n.endswith("_scale_inv"))
    assert_converted_exactly(rt)            # includes: scales stay BF16
    assert_restored_exactly(rt)


# ---------------------------------------------------------------------------------------------
# A checkpoint with several 10-20 MB shards: kill -9, disk full
# ---------------------------------------------------------------------------------------------

def big_checkpoint(folder: Path, cols: tuple[int, ...] = (5120, 6400, 7680, 9216, 5760),
                   rows: int = 2048) -> Path:
    """One shard per entry of `cols`: a random-byte FP8 weight [rows, cols] with a valid F32 scale
    grid at 128x128, and a BF16 norm; plus config.json and the index. Shards differ in size."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    files = [f"model-{i + 1:05d}-of-{len(cols):05d}.safetensors" for i in range(len(cols))]
    weight_map, total = {}, 0
    for i, (k, file) in enumerate(zip(cols, files)):
        w = f"model.layers.{i}.mlp.down_proj.weight"
        part = {
            w: torch.randint(0, 256, (rows, k), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn),
            w + "_scale_inv": torch.rand((math.ceil(rows / 128), math.ceil(k / 128)), generator=g) + 0.5,
            f"model.layers.{i}.post_attention_layernorm.weight": torch.randn(k, generator=g).bfloat16(),
        }
        save_file(part, folder / file, metadata={"format": "pt"})
        for name, t in part.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                      "quant_method": "fp8", "weight_block_size": [128, 128]}}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


@dataclass
class Big:
    original: Path
    converted: Path                 # an uninterrupted --in-place run on a copy (state folder kept)
    original_snapshot: dict[str, str]
    converted_snapshot: dict[str, str]      # without the lock file
    shards: list[str]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Big:
    root = tmp_path_factory.mktemp("big")
    original = big_checkpoint(root / "original")
    converted = root / "converted"
    shutil.copytree(original, converted)
    [r] = run_together((converted, "--in-place", "--no-reflink", "-q"))
    assert_ok(r)
    return Big(original, converted, snapshot(original), without_lock(snapshot(converted)),
               shard_names(original))


@dataclass
class Kill:
    label: str
    start: str                      # "original" or "converted"
    command: tuple
    when: Callable[["Watch"], bool]
    may_finish: bool = False        # the moment is so close to the end that the run may beat the kill
    then: tuple | None = None       # the command run after the kill (default: the same one again)
    patch: str | None = None        # code run in the child (see conftest.command), e.g. a self-kill


@dataclass
class Watch:
    """What the test sees of a running child: time since start, shards replaced (by inode)."""
    folder: Path
    inodes: dict[str, int]
    t0: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def replaced(self) -> int:
        n = 0
        for name, ino in self.inodes.items():
            try:
                n += os.stat(self.folder / name).st_ino != ino
            except FileNotFoundError:
                pass
        return n

    def partial(self, shard: str) -> bool:
        return (self.folder / f".{shard}.partial").exists()


def kill_9_then_rerun(kill: Kill, work: Path) -> tuple[int, str, bool, subprocess.CompletedProcess]:
    """Start the command, SIGKILL it at the chosen moment, then run the same (or the `then`)
    command to the end. Also says whether the in-place record was gone before the re-run."""
    shards = shard_names(work)
    watch = Watch(work, {s: os.stat(work / s).st_ino for s in shards})
    p = start(work, *kill.command, patch=kill.patch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch.t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        while not kill.when(watch) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    seen = f"{watch.replaced()} of {len(shards)} shards replaced" + (
        ", a .partial present" if any(watch.partial(s) for s in shards) else "")
    record_gone = not any((work / name).exists() for name in (STATE, STATE + ".removing"))
    rerun = cli(work, *(kill.then or kill.command), via="python", timeout=120)
    return p.returncode, seen, record_gone, rerun


def run_kills(kills: list[Kill], big: Big, root: Path, expected: dict[str, str],
              view: Callable[[dict], dict]) -> None:
    def one(i: int, kill: Kill) -> str | None:
        work = root / f"kill-{i}"
        shutil.copytree(big.original if kill.start == "original" else big.converted, work)
        rc, seen, record_gone, rerun = kill_9_then_rerun(kill, work)
        print(f"kill -9 {kill.label}: exit {rc}, {seen}")
        problems = []
        if rc != -signal.SIGKILL and not kill.may_finish:
            problems.append(f"the run ended (exit {rc}) before the kill; the moment was not tested")
        # A restore whose record was already removed had done everything (the kill came as it
        # exited): the folder is then the original one, and a re-run is refused like a second
        # --restore, which is no failure.
        restore_had_finished = kill.may_finish and record_gone and "--restore" in (kill.then or kill.command)
        if rerun.returncode != 0 and not (restore_had_finished and "no record" in rerun.stderr):
            problems.append(show(rerun))
        elif view(snapshot(work)) != expected:
            got = view(snapshot(work))
            diff = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
            problems.append(f"differs from an uninterrupted run in {diff}")
        return f"{kill.label} ({seen}): {'; '.join(problems)}" if problems else None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(one, range(len(kills)), kills) if f]
    assert not failures, "\n".join(failures)


KILL_AFTER_SHARD_RENAMES = """
import os, signal
_replace, _renamed = os.replace, []
def replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if str(dst).endswith(".safetensors") and ".resize_block_size" not in str(dst):   # not the record
        _renamed.append(dst)
        if len(_renamed) == {n}:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""


def test_kill_9_during_in_place_then_rerun_gives_the_uninterrupted_result(big, tmp_path):
    first = big.shards[0]
    cmd = ("--in-place", "--no-reflink", "-q")
    kills = [
        Kill("at start (0 s)", "original", cmd, lambda w: True),
        # The whole run takes a fraction of a second here: timed moments may come after the end.
        Kill("after 0.05 s", "original", cmd, lambda w: w.elapsed() >= 0.05, may_finish=True),
        Kill("after 0.15 s", "original", cmd, lambda w: w.elapsed() >= 0.15, may_finish=True),
        Kill("while writing the first shard", "original", cmd,
             lambda w: w.partial(first) or w.replaced() >= 1),
        Kill("after 1 shard replaced", "original", cmd, lambda w: False, patch=KILL_AFTER_SHARD_RENAMES.format(n=1)),
        Kill("after 3 shards replaced", "original", cmd, lambda w: False, patch=KILL_AFTER_SHARD_RENAMES.format(n=3)),
        Kill("after every shard replaced", "original", cmd,
             lambda w: w.replaced() == len(big.shards), may_finish=True),
    ]
    run_kills(kills, big, tmp_path, big.converted_snapshot, without_lock)


def test_kill_9_during_restore_then_rerun_gives_the_original_files(big, tmp_path):
    second = big.shards[1]
    cmd = ("--restore", "--no-reflink", "-q")
    kills = [
        Kill("at start (0 s)", "converted", cmd, lambda w: True),
        Kill("after 0.05 s", "converted", cmd, lambda w: w.elapsed() >= 0.05, may_finish=True),
        Kill("after 0.15 s", "converted", cmd, lambda w: w.elapsed() >= 0.15, may_finish=True),
        Kill("while writing the second shard", "converted", cmd,
             lambda w: w.partial(second) or w.replaced() >= 2),
        # The child kills itself right after its fourth shard is renamed into place: a poll from
        # here can miss that moment (the last shard is restored in a few ms), the child cannot.
        Kill("after 4 shards restored", "converted", cmd, lambda w: False,
             patch=KILL_AFTER_SHARD_RENAMES.format(n=4)),
        Kill("after every shard restored", "converted", cmd,
             lambda w: w.replaced() == len(big.shards), may_finish=True),
    ]
    run_kills(kills, big, tmp_path, big.original_snapshot, lambda s: s)


def test_restore_after_a_killed_in_place_run_gives_the_original_files(big, tmp_path):
    """The user stops an in-place conversion with kill -9 and changes their mind: --restore."""
    cmd = ("--in-place", "--no-reflink", "-q")
    restore = ("--restore", "--no-reflink", "-q")
    kills = [
        Kill("as soon as its state folder appears", "original", cmd,
             lambda w: (w.folder / STATE).exists(), then=restore),
        Kill("after 2 shards replaced", "original", cmd, lambda w: False, then=restore,
             patch=KILL_AFTER_SHARD_RENAMES.format(n=2)),
    ]
    run_kills(kills, big, tmp_path, big.original_snapshot, lambda s: s)


# Kills the process (SIGKILL, no cleanup runs) the first time it removes a folder tree, which a
# restore does only once every file is back: while removing its record.
KILL_AT_FIRST_RMTREE = """
import os, shutil, signal

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

shutil.rmtree = killed
"""


@pytest.mark.parametrize("then", [["--restore"], ["--in-place", "--restore"]], ids=" then ".join)
def test_restore_killed_while_removing_its_record_ends_with_the_original_files(then, ckpt):
    """kill -9 at the very end of a restore; then --restore again, or first convert in place again
    (the record is gone, so the user may well do that) and restore later."""
    before = snapshot(ckpt)
    assert_ok(cli(ckpt, "--in-place", "-q"))
    killed = cli(ckpt, "--restore", "-q", via="python", patch=KILL_AT_FIRST_RMTREE, timeout=120)
    assert killed.returncode == -signal.SIGKILL, show(killed)
    assert (ckpt / (STATE + ".removing")).is_dir() and not (ckpt / STATE).exists(), \
        "the kill did not land while the record was being removed"
    for command in then:
        assert_ok(cli(ckpt, command, "-q"))
    assert snapshot(ckpt) == before


def test_disk_full_during_in_place_fails_in_one_line_keeps_the_shard_and_rerun_completes(big, tmp_path):
    work = tmp_path / "ckpt"
    shutil.copytree(big.original, work)
    sizes = [(big.converted / s).stat().st_size for s in big.shards]
    failing = 2                      # the third shard is the first one larger than the limit
    limit = (max(sizes[:failing]) + sizes[failing]) // 2
    assert all(s < limit for s in sizes[:failing]) and sizes[failing] > limit
    shard = big.shards[failing]

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    [r] = run_together((work, "--in-place", "--no-reflink", "-q"), before=small_files)
    line = assert_one_line_error(r)
    print(f"disk full (file size limit {limit} bytes): {line}")
    assert sha256(work / shard) == big.original_snapshot[shard]
    assert sorted(p.name for p in work.rglob("*.partial")) == []
    for s in big.shards[:failing]:
        assert sha256(work / s) == big.converted_snapshot[s], f"{s} was finished before the failure"
    for s in big.shards[failing + 1:]:
        assert sha256(work / s) == big.original_snapshot[s], f"{s} was touched after the failure"

    [r] = run_together((work, "--in-place", "--no-reflink", "-q"))
    assert_ok(r)
    assert without_lock(snapshot(work)) == big.converted_snapshot


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def genuine_64(tmp_path) -> Path:
    """A checkpoint really quantized at 64x64: its scales are not replications of 128x128 ones."""
    return tc.write_checkpoint(tmp_path / "Model-64", tc.deepseek_v3_tensors(block=(64, 64)),
                               tc.deepseek_v3_config(block=(64, 64)), extra_files=tc.default_extra_files())


@pytest.mark.parametrize("where", ["separate output", "in place"])
def test_block_size_128_refuses_scales_that_are_not_replications_naming_the_tensor(where, genuine_64, tmp_path):
    before = snapshot(genuine_64)
    listing = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out-128"
    mode = ("-o", out) if where == "separate output" else ("--in-place",)
    r = cli(genuine_64, "--block-size", "128", *mode, "-q")
    line = assert_one_line_error(r)
    named = re.findall(r"[\w.]+_scale_inv", line)
    assert named, f"no tensor named in: {line}"
    scale = load_all(genuine_64)[named[0]]
    assert not is_replication(scale, (2, 2)), f"{named[0]} is a replication, yet was refused"
    assert snapshot(genuine_64) == before, "the input was changed (or a state folder left in it)"
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "something was written next to the input"


def test_restore_refuses_a_folder_never_converted_in_place(ckpt):
    before = snapshot(ckpt)
    r = cli(ckpt, "--restore", "-q")
    assert_one_line_error(r)
    assert snapshot(ckpt) == before


def test_a_second_restore_is_refused_and_leaves_the_original_files(ckpt):
    """What a re-run meets when the kill of a restore came after its last step."""
    before = snapshot(ckpt)
    assert_ok(cli(ckpt, "--in-place", "-q"))
    assert_ok(cli(ckpt, "--restore", "-q"))
    line = assert_one_line_error(cli(ckpt, "--restore", "-q"))
    assert "no record" in line and "--restore finished" in line, line
    assert snapshot(ckpt) == before


def test_in_place_refuses_a_different_conversion_than_the_recorded_one(big, tmp_path):
    """A folder converted in place to 64x64 (finished, or killed after its first shard) refuses
    --in-place --block-size 32, saying which conversion it holds, and is left as it was."""
    finished = tmp_path / "finished"
    shutil.copytree(big.converted, finished)
    interrupted = tmp_path / "interrupted"          # exactly what a kill after the first shard leaves
    shutil.copytree(big.original, interrupted)
    shutil.copytree(big.converted / STATE, interrupted / STATE)
    shutil.copy2(big.converted / big.shards[0], interrupted / big.shards[0])
    folders = [finished, interrupted]
    before = [without_lock(snapshot(f)) for f in folders]
    for f, b in zip(folders, before):
        r = cli(f, "--in-place", "--block-size", "32", "-q")
        line = assert_one_line_error(r)
        assert "64x64" in line, line
        assert without_lock(snapshot(f)) == b, f"{f.name} was changed"


BAD_FLAGS = [
    ("--in-place", "-o", "{tmp}/X"),
    ("--restore", "--block-size", "32"),
    ("--restore", "-o", "{tmp}/X"),
    ("--restore", "--in-place"),
    ("--restore", "--dry-run"),
    ("--in-place", "--verify"),
]


def test_in_place_and_restore_refuse_bad_flags_in_one_line(ckpt, tmp_path):
    before = snapshot(ckpt)
    listing = sorted(p.name for p in tmp_path.iterdir())
    for flags in BAD_FLAGS:
        r = cli(ckpt, *(f.format(tmp=tmp_path) for f in flags))
        assert_one_line_error(r)
        assert r.stdout == "", show(r)
    assert snapshot(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


# ---------------------------------------------------------------------------------------------
# Disk: what --dry-run announces, what a run really takes
# ---------------------------------------------------------------------------------------------

def test_dry_run_in_place_writes_nothing_and_shows_the_largest_new_shard(round_trips):
    rt = round_trips["64x64"]               # its copy, converted normally to a separate folder
    assert_ok(rt.separate)
    folder = rt.separate_input
    text = cli(folder, "--dry-run", "--in-place")
    as_json = cli(folder, "--dry-run", "--in-place", "--json")
    assert_ok(text)
    assert_ok(as_json)
    largest = max((rt.separate_folder / s).stat().st_size for s in shard_names(rt.separate_folder))
    assert json.loads(as_json.stdout)["in_place_extra_bytes"] == largest
    peak = [line for line in text.stdout.splitlines() if "peak extra disk" in line]
    assert len(peak) == 1 and decimal(largest) in peak[0], text.stdout
    assert snapshot(folder) == rt.original
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, rt.separate_folder.name])


@pytest.fixture
def small_ext4(tmp_path) -> Path:
    """A 300 MB ext4 filesystem on a loop device, unmounted afterwards."""
    image, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    mnt.mkdir()
    try:
        with open(image, "wb") as f:
            f.truncate(300 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot loop-mount an ext4 image here (needs root and loop devices): "
                    f"{e} {detail.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_in_place_peak_extra_disk_is_at_most_one_shard(small_ext4):
    ckpt = big_checkpoint(small_ext4 / "ckpt", cols=(10240, 12800, 15360, 11520))   # 21-32 MB shards
    os.sync()

    def free() -> int:
        st = os.statvfs(small_ext4)
        return st.f_bavail * st.f_frsize

    free_at_start = free()
    p = start(ckpt, "--in-place", "-q")
    lowest, polls = free_at_start, 0
    try:
        while p.poll() is None:
            lowest = min(lowest, free())
            polls += 1
            time.sleep(0.002)
    finally:
        out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    largest = max((ckpt / s).stat().st_size for s in shard_names(ckpt))
    smallest = min((ckpt / s).stat().st_size for s in shard_names(ckpt))
    peak = free_at_start - lowest
    print(f"in place on ext4: peak extra disk {peak} bytes ({peak / 1e6:.1f} MB) over {polls} polls; "
          f"largest new shard {largest} bytes ({largest / 1e6:.1f} MB), "
          f"peak - largest shard = {(peak - largest) / 1e6:+.2f} MB")
    assert peak > smallest // 2, f"polling saw only {peak} bytes in use: the measurement missed the run"
    assert lowest >= free_at_start - (largest + 4_000_000)
