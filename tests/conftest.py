"""Shared helpers: build realistic tiny checkpoints, run the CLI, snapshot folders, dequantize."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import resize_block_size as rbs  # noqa: E402
import tiny_checkpoints as tc  # noqa: E402

TOOL = ROOT / "resize_block_size.py"


# ---------------------------------------------------------------------------------------------
# Running the command line: one runner, `cli()`, and `start()` for a run the test must watch
# ---------------------------------------------------------------------------------------------

def default_sigint() -> None:
    """Give a child the default SIGINT disposition even if pytest was started with SIGINT ignored
    (a background job), so that Python installs its KeyboardInterrupt handler in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def command(*args: object, via: str = "python", patch: str | None = None) -> list[str]:
    """The argv of a real process running the tool with `args`.

    via="python" is `python resize_block_size.py ARGS`; via="script" is the installed
    `resize-block-size` console script. `patch` is Python source run in the child after
    `import resize_block_size as rbs` and before `rbs.main_exit()` (it may replace module
    functions; the module is imported under its own name so that such patches take effect).
    """
    argv = [str(a) for a in args]
    if via == "script":
        assert patch is None, "the console script cannot be patched; use via='python'"
        script = shutil.which("resize-block-size")
        if script is None:
            pytest.fail("the `resize-block-size` console script is not on PATH; pip install -e . first")
        return [script, *argv]
    assert via == "python", f"a real process runs via 'python' or 'script', not {via!r}"
    if patch is None:
        return [sys.executable, str(TOOL), *argv]
    code = (f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport resize_block_size as rbs\n"
            f"{patch}\nrbs.main_exit()\n")
    return [sys.executable, "-u", "-c", code, *argv]


def start(*args: object, via: str = "python", patch: str | None = None,
          before: Callable[[], None] | None = None, **popen) -> subprocess.Popen:
    """Start the tool in a real process (text pipes for stdout and stderr unless given) and return
    at once: for runs a test kills, signals, races against another or reads line by line.
    `before()` runs in the child before the tool starts (after SIGINT is made the default)."""
    def preexec() -> None:
        default_sigint()
        if before is not None:
            before()
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(command(*args, via=via, patch=patch), text=True, preexec_fn=preexec, **popen)


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """Wait for a started run (killing it after `timeout` seconds, which fails the test)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{' '.join(map(str, proc.args))} did not finish in {timeout} s") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli(*args: object, via: str | None = None, patch: str | None = None, cwd: Path | str | None = None,
        env: dict[str, str] | None = None, before: Callable[[], None] | None = None,
        timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    """Run `resize-block-size ARGS` to the end; its exit code, stdout and stderr.

    via="fork" (the default) forks this process and calls `main_exit()`, the console script's
    entry point, in the child with fds 1 and 2 sent to files: what a new interpreter would do,
    minus its start-up and imports. Monkeypatches made in the test are inherited; `before()` runs
    in the child first (like subprocess's preexec_fn); an exception escaping is printed as a
    traceback with exit 1, and non-daemon threads are joined before the exit, as the interpreter
    does. via="python" or "script" start a real process (see `command()`): for the console script
    itself, environment variables read at import (HF_HUB_CACHE), and `patch` code.
    RBS_TEST_SUBPROCESS=1 in the environment makes the default a real `python` run; a test that
    needs the fork (its monkeypatches or `before()` patches reach the tool) says via="fork".
    """
    argv = [str(a) for a in args]
    if via is None:
        via = "python" if os.environ.get("RBS_TEST_SUBPROCESS") else "fork"
    if via != "fork":
        result = finish(start(*argv, via=via, patch=patch, before=before, cwd=cwd, env=env), timeout)
    else:
        assert patch is None, "patch code runs in a real process (via='python'); use before= with a fork"
        if env is not None and "huggingface_hub" in sys.modules:
            raise AssertionError("huggingface_hub read its environment at import in this process: "
                                 "run with via='python' to give the tool another environment")
        result = _forked(argv, cwd, env, before, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def _forked(argv: list[str], cwd: Path | str | None, env: dict[str, str] | None,
            before: Callable[[], None] | None, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:                                    # the child: never returns
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                if cwd is not None:
                    os.chdir(cwd)
                if env is not None:
                    os.environ.clear()
                    os.environ.update(env)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if before is not None:
                    before()
                sys.argv = [str(TOOL), *argv]
                try:
                    rbs.main_exit()
                    code = 0
                except SystemExit as e:
                    if isinstance(e.code, int) or e.code is None:
                        code = e.code or 0
                    else:
                        print(e.code, file=sys.stderr)
                        code = 1
                except BaseException:
                    traceback.print_exc()
                    code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    for thread in threading.enumerate():    # as the interpreter does at exit
                        if thread is not threading.current_thread() and not thread.daemon:
                            thread.join()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"resize-block-size {' '.join(argv)} did not finish in {timeout} s")
            time.sleep(0.002)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["resize-block-size", *argv], os.waitstatus_to_exitcode(status),
                                           out.read().decode(errors="replace"), err.read().decode(errors="replace"))


# ---------------------------------------------------------------------------------------------
# Looking at folders
# ---------------------------------------------------------------------------------------------

def snapshot(folder: Path, *, follow_links: bool = True, mtimes: bool = False) -> dict[str, object]:
    """What is below `folder`, by relative path: equal snapshots mean nothing changed.

    follow_links=True: every file (symlinks followed) by its sha256; folders are not listed.
    follow_links=False: files by sha256, folders as "folder" and symlinks as "symlink -> TARGET",
    the folder itself as "." too: nothing created, removed, changed or re-pointed.
    Either way a FIFO, socket or device is recorded by its kind ("fifo"...), never opened: opening
    a FIFO would block the test.
    mtimes=True adds each entry's mtime_ns (never following links): nothing touched either.
    """
    out: dict[str, object] = {}
    if not follow_links:
        out["."] = "folder"
    for root, dirs, files in os.walk(folder, followlinks=follow_links):
        names = files if follow_links else dirs + files
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if not follow_links and path.is_symlink():
                out[rel] = f"symlink -> {os.readlink(path)}"
            elif not follow_links and path.is_dir():
                out[rel] = "folder"
            else:
                mode = path.stat().st_mode
                out[rel] = _sha256(path) if stat.S_ISREG(mode) else _special_kind(mode)
    if mtimes:
        return {rel: (what, os.lstat(folder / rel).st_mtime_ns) for rel, what in out.items()}
    return out


def _special_kind(mode: int) -> str:
    """What a file that is not a regular one is, by its st_mode."""
    for test, kind in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    raise AssertionError(f"unknown file type {stat.filemode(mode)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing safetensors files by hand (8-byte little-endian header length, JSON header, data), for
# layouts and damage the safetensors library will not write. Well-formed checkpoints are written
# by the library itself (tc.write_checkpoint).
# ---------------------------------------------------------------------------------------------

Tensor = tuple[str, list[int], bytes]           # dtype, shape, raw little-endian bytes


def layout(tensors: dict[str, Tensor], metadata: dict | None = None) -> tuple[dict, bytes]:
    """A safetensors header (as a dict) and data area for `tensors`, packed in their order."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    data, offset = [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    return header, b"".join(data)


def write_safetensors(path: Path, header: object, data: bytes = b"", *,
                      header_len: int | None = None, file_size: int | None = None) -> Path:
    """Write a safetensors file byte by byte: `header` is a JSON value (or raw bytes), padded
    with spaces to 8 bytes; `header_len` overrides the length field; `file_size` extends the
    file sparsely (or cuts it)."""
    body = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body) if header_len is None else header_len))
        f.write(body)
        f.write(data)
        if file_size is not None:
            f.truncate(file_size)
    return path


def read_header(path: Path) -> tuple[dict | None, dict[str, dict], int]:
    """(__metadata__ or None, tensor entries, data start) of a safetensors file, parsed by hand
    (the safetensors library does not show where a tensor's bytes lie)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None)
    return meta, header, 8 + n


# ---------------------------------------------------------------------------------------------
# Reading checkpoints back with the safetensors library
# ---------------------------------------------------------------------------------------------

def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in `folder`."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Every FP8 weight of a checkpoint dequantized with the block its config.json declares."""
    block = tuple(json.loads((folder / "config.json").read_text())["quantization_config"]["weight_block_size"])
    tensors = load_all(folder)
    return {name: tc.dequantize_block_fp8(t, tensors[name + "_scale_inv"], block)
            for name, t in tensors.items() if t.dtype == torch.float8_e4m3fn}


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints written by the safetensors library
# ---------------------------------------------------------------------------------------------

def deepseek(folder: Path, *, shards: int = 3, scale_dtype: torch.dtype = torch.float32,
             extra_files: dict | None = None, **dims) -> Path:
    """A tiny DeepSeek-V3 checkpoint with the example's layout (MTP, cross-shard pairs, subfolders)."""
    return tc.write_checkpoint(folder, tc.deepseek_v3_tensors(scale_dtype=scale_dtype, **dims),
                               tc.deepseek_v3_config(**dims), shards=shards,
                               extra_files=tc.default_extra_files() if extra_files is None else extra_files)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A DeepSeek-V3 checkpoint with dims that are not multiples of 128 (192, 576-like rows)."""
    return deepseek(tmp_path / "DeepSeek-V3")
