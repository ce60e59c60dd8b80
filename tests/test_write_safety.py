"""The write side under adversity: sources that change during a run, concurrent runs, damaged
in-place records, interruptions, a missing progress-bar library.

Every run that must be a real process (races, kills, timing, a missing module) is one; the rest
run in a forked child of this process (conftest's `cli()`), which inherits the test's monkeypatches.
Expectations come from the input files themselves (sha256, sizes, the safetensors library), or
from an uninterrupted run of the same command on a copy.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open

from conftest import cli, deepseek, finish, load_all, snapshot, start

import resize_block_size as rbs

STATE = ".resize_block_size"
ERROR = "resize-block-size: error: "
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def show(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, show(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR) and "Traceback" not in r.stderr, show(r)
    return lines[0]


def partials(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.partial"))


def tensors_of(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor as (dtype, shape, bytes), read with the safetensors library."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint and its uninterrupted conversion (by a separate process), never modified."""
    root = tmp_path_factory.mktemp("reference")
    model = deepseek(root / "DeepSeek-V3")
    r = finish(start(model, "-o", root / "out", "-q"))
    assert r.returncode == 0, show(r)
    return model, root / "out"


@pytest.fixture
def model(reference, tmp_path) -> Path:
    """A fresh copy of the reference checkpoint."""
    copy = tmp_path / "DeepSeek-V3"
    shutil.copytree(reference[0], copy)
    return copy


def replace_during_planning(monkeypatch, change: Callable[[Path], None]) -> None:
    """Run `change(input folder)` right after the plan is made, before anything is copied."""
    real = rbs.make_plan

    def plan_then_change(ckpt, output_dir, target):
        plan = real(ckpt, output_dir, target)
        change(ckpt.folder)
        return plan
    monkeypatch.setattr(rbs, "make_plan", plan_then_change)


def same_bytes_new_data(path: Path) -> None:
    """Replace `path` by a new file of the same size and header whose last tensor byte differs,
    as a re-download of another revision with the same layout would."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def rewrite_in_place(path: Path) -> None:
    """Change one tensor byte of `path` without replacing the file (same inode, same size)."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))


# ---------------------------------------------------------------------------------------------
# 1. The bytes copied are the bytes planned
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    (lambda m: same_bytes_new_data(m / SHARDS[1]), [SHARDS[1], "replaced"]),
    (lambda m: rewrite_in_place(m / SHARDS[1]), [SHARDS[1], "modified"]),
    (lambda m: same_bytes_new_data(m / "inference" / "kernel.py"), ["inference/kernel.py", "replaced"]),
], ids=["shard-replaced", "shard-rewritten", "file-in-subfolder-replaced"])
def test_a_source_changed_between_planning_and_copying_is_refused_with_no_finished_output(
        change, words, model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    replace_during_planning(monkeypatch, change)
    line = one_line_error(cli(model, "-o", out, "-q", via="fork"))
    assert "changed during the run" in line and all(w in line for w in words), line
    assert not (out / "config.json").exists(), "a finished output was left"
    assert partials(out) == [] if out.exists() else True


def test_in_place_refuses_a_shard_replaced_after_planning_and_leaves_it_as_it_is(model, monkeypatch):
    replaced = model.parent / "replaced.bin"     # the run is a forked child: it reports through a file

    def change(folder: Path) -> None:
        same_bytes_new_data(folder / SHARDS[0])
        shutil.copyfile(folder / SHARDS[0], replaced)
    replace_during_planning(monkeypatch, change)
    line = one_line_error(cli(model, "--in-place", "-q", via="fork"))
    assert "changed during the run" in line and SHARDS[0] in line, line
    assert (model / SHARDS[0]).read_bytes() == replaced.read_bytes()
    assert partials(model) == []


def test_a_copied_run_that_reads_back_wrong_is_not_renamed_into_place(model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = rbs.ByteCopier.copy

    def copy_then_flip_first_byte(self, src_fd, dst_fd, run):
        real(self, src_fd, dst_fd, run)
        first = os.pread(dst_fd, 1, run.dst)
        os.pwrite(dst_fd, bytes([first[0] ^ 0xFF]), run.dst)
    monkeypatch.setattr(rbs.ByteCopier, "copy", copy_then_flip_first_byte)
    line = one_line_error(cli(model, "-o", out, "-q", via="fork"))
    assert "read back differ from the source" in line, line
    assert not any((out / s).exists() for s in SHARDS)
    assert partials(out) == []


def test_a_conversion_is_refused_while_the_input_is_converted_in_place(model, tmp_path):
    before = snapshot(model)
    fd = os.open(model, os.O_RDONLY | os.O_DIRECTORY)     # what an --in-place or --restore run holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = one_line_error(cli(model, "-o", tmp_path / "out", "-q"))
    finally:
        os.close(fd)
    assert "another resize-block-size run" in line and "in place" in line, line
    assert not (tmp_path / "out").exists()
    assert snapshot(model) == before


@pytest.mark.parametrize("mode", ["--in-place", "--restore"])
def test_in_place_and_restore_are_refused_while_a_conversion_reads_the_input(mode, model):
    if mode == "--restore":
        assert cli(model, "--in-place", "-q").returncode == 0
    before = snapshot(model)
    fd = os.open(model, os.O_RDONLY | os.O_DIRECTORY)     # what a conversion of it holds
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        line = one_line_error(cli(model, mode, "-q"))
    finally:
        os.close(fd)
    assert "another resize-block-size run" in line, line
    assert snapshot(model) == before


def test_in_place_and_a_conversion_of_the_same_input_run_at_once_never_mix(reference, tmp_path):
    """Both at once, several times: the conversion either writes exactly the reference output,
    or is refused in one line, or (the in-place run having finished first) finds a 64x64 input and
    writes nothing; the in-place run either converts the folder or is refused. (A refusal may also
    come from validating a folder read half-converted, before any lock is taken.)"""
    model, expected_out = reference
    expected = tensors_of(expected_out)
    for i in range(4):
        work = tmp_path / f"run-{i}"
        shutil.copytree(model, work / "model")
        procs = [start(work / "model", "--in-place", "-q"), start(work / "model", "-o", work / "out", "-q")]
        if i % 2:
            procs.reverse()
        results = [finish(p) for p in procs]
        for r in results:
            if r.returncode != 0:
                one_line_error(r)
        conversion = results[1 if i % 2 == 0 else 0]
        in_place = results[0 if i % 2 == 0 else 1]
        if conversion.returncode == 0 and not (work / "out").exists():     # nothing left to convert
            assert in_place.returncode == 0, show(in_place)
            assert json.loads((work / "model" / "config.json").read_text())["quantization_config"][
                "weight_block_size"] == [64, 64]
        elif conversion.returncode == 0:
            assert tensors_of(work / "out") == expected
            assert json.loads((work / "out" / "config.json").read_text()) == \
                json.loads((expected_out / "config.json").read_text())
        else:
            assert not (work / "out" / "config.json").exists()


# ---------------------------------------------------------------------------------------------
# 8. Interruptions and concurrent runs leave nothing behind
# ---------------------------------------------------------------------------------------------

KILL_IN_SUBFOLDER = """
import os, signal
real = rbs.check_source_unchanged
def kill_in_subfolder(fd, opened, name):
    if "/" in name:
        os.kill(os.getpid(), signal.SIGKILL)      # its .NAME.partial is complete but not renamed
    real(fd, opened, name)
rbs.check_source_unchanged = kill_in_subfolder
"""


def test_a_partial_file_left_in_a_subfolder_is_removed_by_the_rerun(reference, tmp_path):
    model, expected_out = reference
    out = tmp_path / "out"
    killed = cli(model, "-o", out, "-q", via="python", patch=KILL_IN_SUBFOLDER)
    assert killed.returncode == -signal.SIGKILL, show(killed)
    left = partials(out)
    assert left and all("/" in p for p in left), left
    r = finish(start(model, "-o", out, "-q"))
    assert r.returncode == 0, show(r)
    assert partials(out) == []
    assert snapshot(out) == snapshot(expected_out)


def test_partials_are_never_removed_through_a_symlink_planted_in_the_output(model, tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / ".kernel.py.partial").write_bytes(b"not yours")
    (out / STATE).mkdir(parents=True)               # an unfinished run of this conversion...
    (out / "inference").symlink_to(outside)         # ...with a subfolder that leads elsewhere
    r = cli(model, "-o", out, "-q")
    if r.returncode != 0:
        assert "inference" in one_line_error(r)
    assert (outside / ".kernel.py.partial").read_bytes() == b"not yours"


def test_the_output_lock_is_taken_on_the_folder_at_the_path_not_one_removed_meanwhile(tmp_path, monkeypatch):
    out, calls = tmp_path / "out", []
    real = fcntl.flock

    def removed_and_recreated_first(fd: int, op: int) -> None:
        calls.append(op)
        if len(calls) == 1:          # a refused run removes the folder it created, another makes it again
            out.rmdir()
            out.mkdir()
        real(fd, op)
    monkeypatch.setattr(fcntl, "flock", removed_and_recreated_first)
    lock = rbs.FolderLock(out, exclusive=True)
    lock.acquire(create=True)
    try:
        assert len(calls) == 2
        assert os.fstat(lock.fd).st_ino == os.stat(out).st_ino
    finally:
        lock.release()


PAUSE_WHILE_REMOVING_STATE = """
import os, shutil, time
real = shutil.rmtree
def slow_rmtree(path, *args, **kwargs):
    if str(path).endswith("{state}"):
        open(os.environ["MARK"], "w").close()     # tell the test: the state folder is going now
        time.sleep(2)
    real(path, *args, **kwargs)
shutil.rmtree = slow_rmtree
""".format(state=STATE)


def test_a_run_starting_while_another_removes_its_state_folder_is_refused(reference, tmp_path):
    model, expected_out = reference
    out, mark = tmp_path / "out", tmp_path / "removing"
    first = start(model, "-o", out, "-q", patch=PAUSE_WHILE_REMOVING_STATE, env={**os.environ, "MARK": str(mark)})
    deadline = time.monotonic() + 60
    while not mark.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert mark.exists(), show(finish(first))
    second = finish(start(model, "-o", out, "-q"))
    line = one_line_error(second)
    assert "another resize-block-size run" in line and str(out) in line, line
    assert finish(first).returncode == 0
    assert snapshot(out) == snapshot(expected_out)


def test_three_runs_on_one_output_each_finish_or_say_another_run_is_writing(reference, tmp_path):
    model, expected_out = reference
    expected = snapshot(expected_out)
    for i in range(5):
        out = tmp_path / f"out-{i}"
        results = [finish(p) for p in [start(model, "-o", out, "-q") for _ in range(3)]]
        for r in results:
            if r.returncode != 0:
                line = one_line_error(r)
                assert "another resize-block-size run is writing" in line, line
        assert any(r.returncode == 0 for r in results), [show(r) for r in results]
        assert snapshot(out) == expected


SLOW_UNLINK_AND_CTRL_C = """
import os, signal, sys, time
real_unlink, real_open = os.unlink, os.open
def slow_unlink(path, *args, **kwargs):
    if os.fspath(path).endswith(".partial") and os.path.exists(path):
        time.sleep(3)                              # a big file on a disk mounted with `discard`
    real_unlink(path, *args, **kwargs)
def open_then_ctrl_c(path, flags, *args, **kwargs):
    fd = real_open(path, flags, *args, **kwargs)
    if os.fspath(path).endswith(".partial"):
        print("SIGINT", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
    return fd
os.unlink, os.open = slow_unlink, open_then_ctrl_c
"""


def test_ctrl_c_is_answered_within_a_second_when_removing_the_partial_is_slow(model, tmp_path):
    out = tmp_path / "out"
    p = start(model, "-o", out, "-q", patch=SLOW_UNLINK_AND_CTRL_C)
    seen: dict[str, float] = {}
    for line in p.stderr:
        seen.setdefault("interrupted" if "interrupted" in line else line.strip(), time.monotonic())
    p.wait(timeout=60)
    exited = time.monotonic()
    assert p.returncode == 130, seen
    assert seen["interrupted"] - seen["SIGINT"] < 1.0, seen
    assert exited - seen["SIGINT"] >= 2.5, "the slow unlink did not run before the exit"
    assert partials(out) == [], "the partial file was left behind"


def test_without_tqdm_the_run_stops_before_writing_anything_or_runs_quietly(model, tmp_path):
    no_tqdm = "sys.modules['tqdm'] = None"
    r = cli(model, "-o", tmp_path / "out", via="python", patch=no_tqdm, timeout=120)
    line = one_line_error(r)
    assert "tqdm" in line and "--quiet" in line, line
    assert not (tmp_path / "out").exists()
    quiet = cli(model, "-o", tmp_path / "quiet", "-q", via="python", patch=no_tqdm, timeout=120)
    assert quiet.returncode == 0, show(quiet)
    assert tensors_of(tmp_path / "quiet").keys() == load_all(model).keys()


# ---------------------------------------------------------------------------------------------
# 3. Restore never claims what it did not do
# ---------------------------------------------------------------------------------------------

def _empty_run_json(state: Path) -> None:
    (state / "run.json").write_text("")


def _drop_key(key: str) -> Callable[[Path], None]:
    def edit(state: Path) -> None:
        run = json.loads((state / "run.json").read_text())
        del run[key]
        (state / "run.json").write_text(json.dumps(run))
    return edit


def _set_key(key: str, value: object) -> Callable[[Path], None]:
    def edit(state: Path) -> None:
        run = json.loads((state / "run.json").read_text())
        run[key] = value(run) if callable(value) else value
        (state / "run.json").write_text(json.dumps(run))
    return edit


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda state: (state / rel).unlink()


DAMAGE = {
    "empty-run.json": _empty_run_json,
    "no-shards-key": _drop_key("shards"),
    "no-target-block": _drop_key("target_block"),
    "shard-name-with-a-path": _set_key("shards", lambda run: {"../" + k: v for k, v in run["shards"].items()}),
    "size-not-an-int": _set_key("shards", lambda run: {k: str(v) for k, v in run["shards"].items()}),
    "size-that-the-header-does-not-fit": _set_key("shards", lambda run: {k: v + 8 for k, v in run["shards"].items()}),
    "header-file-missing": _remove(f"original/headers/{SHARDS[1]}"),
    "config-missing": _remove("original/config.json"),
    "index-missing": _remove("original/model.safetensors.index.json"),
}


@pytest.mark.parametrize("mode", ["--restore", "--in-place"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_in_place_record_is_refused_in_one_line_and_kept(damage, mode, model):
    assert cli(model, "--in-place", "-q").returncode == 0
    DAMAGE[damage](model / STATE)
    before = snapshot(model)
    line = one_line_error(cli(model, mode, "-q"))
    assert STATE in line and "in-place record is damaged" in line, line
    assert snapshot(model) == before, "the record or the shards were changed"


def test_restore_of_a_run_stopped_while_recording_removes_the_record_and_keeps_the_originals(model):
    original = snapshot(model)
    assert cli(model, "--in-place", "-q").returncode == 0
    assert cli(model, "--restore", "-q").returncode == 0
    # What a kill leaves between the saved headers and run.json (written last): nothing replaced.
    state = model / STATE
    shutil.copytree(model, model.parent / "scratch")
    assert cli(model.parent / "scratch", "--in-place", "-q").returncode == 0
    shutil.copytree(model.parent / "scratch" / STATE / "original", state / "original")
    r = cli(model, "--restore", "-q")
    assert r.returncode == 0, show(r)
    assert snapshot(model) == original


def test_restore_refuses_a_record_without_run_json_whose_shard_was_replaced(model):
    assert cli(model, "--in-place", "-q").returncode == 0
    (model / STATE / "run.json").unlink()           # the converted shards no longer match it
    before = snapshot(model)
    line = one_line_error(cli(model, "--restore", "-q"))
    assert "in-place record is damaged" in line and "no run.json" in line, line
    assert snapshot(model) == before


def test_restore_says_restored_only_after_checking_every_file_against_the_record(model, monkeypatch):
    assert cli(model, "--in-place", "-q").returncode == 0
    real = rbs.write_text

    def config_written_wrong(path: Path, text: str) -> None:
        real(path, text + " " if path.name == "config.json" else text)
    monkeypatch.setattr(rbs, "write_text", config_written_wrong)
    r = cli(model, "--restore", "-q", via="fork")
    line = one_line_error(r)
    assert "config.json" in line and "record was kept" in line, line
    assert (model / STATE / "run.json").is_file()


KILL_AT_FIRST_RMTREE = """
import os, shutil, signal
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
shutil.rmtree = killed
"""


def test_restore_killed_while_removing_its_record_is_finished_by_the_rerun(model):
    original = snapshot(model)
    assert cli(model, "--in-place", "-q").returncode == 0
    killed = cli(model, "--restore", "-q", via="python", patch=KILL_AT_FIRST_RMTREE, timeout=120)
    assert killed.returncode == -signal.SIGKILL, show(killed)
    assert (model / (STATE + ".removing")).is_dir() and not (model / STATE).exists(), \
        "the kill did not land while the record was being removed"
    r = cli(model, "--restore", "-q")
    assert r.returncode == 0, show(r)
    assert snapshot(model) == original


def test_in_place_and_restore_at_once_never_lose_the_record_of_converted_shards(reference, tmp_path):
    model, _ = reference
    original = snapshot(model)
    for i in range(4):
        work = tmp_path / f"run-{i}"
        shutil.copytree(model, work)
        if i % 2:           # restore starting on a converted folder, in-place converting again
            assert cli(work, "--in-place", "-q").returncode == 0
            assert cli(work, "--restore", "-q").returncode == 0
        results = [finish(p) for p in (start(work, "--in-place", "-q"), start(work, "--restore", "-q"))]
        for r in results:
            if r.returncode != 0:
                line = one_line_error(r)
                assert "another" in line or "no record" in line, line
        # Whatever happened, a restore now gives back the original files (or there is nothing to do).
        if (work / STATE).exists():
            r = cli(work, "--restore", "-q")
            assert r.returncode == 0, show(r)
        assert snapshot(work) == original


# ---------------------------------------------------------------------------------------------
# The copy method: one fallback rule, shared by every worker
# ---------------------------------------------------------------------------------------------

def test_a_kernel_refusal_met_by_one_worker_moves_every_worker_to_the_fallback(reference, tmp_path, monkeypatch):
    model, expected_out = reference
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError(18, "Invalid cross-device link")          # EXDEV, as across filesystems
    monkeypatch.setattr(os, "copy_file_range", refuse)
    plan = rbs.make_plan(rbs.read_checkpoint(model), tmp_path / "out", (64, 64))
    summary = rbs.convert(plan, copy="copy_file_range", workers=2, quiet=True)
    assert summary.method == "buffered"
    assert 1 <= len(calls) <= 2, "a worker tried copy_file_range again after the refusal was known"
    assert snapshot(tmp_path / "out") == snapshot(expected_out)
