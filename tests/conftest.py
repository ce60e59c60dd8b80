"""Shared helpers: build realistic tiny checkpoints, run the CLI, snapshot folders, dequantize."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import tiny_checkpoints as tc  # noqa: E402

TOOL = ROOT / "resize_block_size.py"


def run_tool(*args: object, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the command line as a user would, in a child process."""
    result = subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                            text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def run_cli(*args: object, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `resize-block-size` console script, exactly as a user types it."""
    script = shutil.which("resize-block-size")
    if script is None:
        pytest.fail("the `resize-block-size` console script is not on PATH; pip install -e . first")
    result = subprocess.run([script, *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` (following symlinks), by relative path."""
    out = {}
    for root, _, files in os.walk(folder, followlinks=True):
        for f in files:
            path = Path(root) / f
            out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


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
