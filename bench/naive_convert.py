"""The naive baseline bench.py compares resize_block_size.py against: load, resize, save.

For each shard: `safetensors.torch.load_file` (the whole shard in memory), repeat every
`*_scale_inv` (bn/bn') x (bk/bk') times and trim it to ceil(dim/bn') x ceil(dim/bk'), then
`save_file` the whole shard again with metadata {"format": "pt"}. Every other file is copied and
config.json gets the new weight_block_size. No streaming, no copy-on-write, no resume: this is
what a user would write first.

    python bench/naive_convert.py INPUT OUTPUT [--block-size 64]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SCALE_SUFFIX = "_scale_inv"
CONFIG_NAME = "config.json"


def weight_shapes(shards: list[Path]) -> dict[str, list[int]]:
    """Shape of every tensor of the checkpoint, from the headers (a weight may sit in another shard)."""
    shapes = {}
    for path in shards:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shapes[name] = f.get_slice(name).get_shape()
    return shapes


def resize_scale(scale: torch.Tensor, weight_shape: list[int], factor: tuple[int, int],
                 block: tuple[int, int]) -> torch.Tensor:
    grown = scale.repeat_interleave(factor[0], dim=-2).repeat_interleave(factor[1], dim=-1)
    rows, cols = math.ceil(weight_shape[-2] / block[0]), math.ceil(weight_shape[-1] / block[1])
    return grown[..., :rows, :cols].contiguous()


def convert_shard(src: Path, dst: Path, shapes: dict[str, list[int]], factor: tuple[int, int],
                  block: tuple[int, int]) -> None:
    tensors = load_file(src)
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            weight_shape = shapes[name[: -len(SCALE_SUFFIX)]]
            tensors[name] = resize_scale(tensor, weight_shape, factor, block)
    save_file(tensors, dst, metadata={"format": "pt"})


def convert(input_dir: Path, output_dir: Path, target: tuple[int, int]) -> None:
    config = json.loads((input_dir / CONFIG_NAME).read_text())
    source = config["quantization_config"]["weight_block_size"]
    factor = (source[0] // target[0], source[1] // target[1])
    shards = sorted(input_dir.glob("*.safetensors"))
    shapes = weight_shapes(shards)
    output_dir.mkdir(parents=True)
    for src in shards:
        convert_shard(src, output_dir / src.name, shapes, factor, target)
    for path in input_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != CONFIG_NAME:
            shutil.copyfile(path, output_dir / path.name)
    config["quantization_config"]["weight_block_size"] = list(target)
    (output_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--block-size", type=int, default=64)
    args = p.parse_args()
    convert(args.input, args.output, (args.block_size, args.block_size))


if __name__ == "__main__":
    main()
