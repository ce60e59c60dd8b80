"""Peak memory of validating and planning a checkpoint whose header holds many tensors.

The memory of a run grows with the number of tensors in a shard header (everything else is
bounded by fixed-size buffers). This builds a header-only checkpoint: one shard of N/2 FP8
weights [256, 256] and their F32 scales [2, 2] (N tensors), whose data area is a sparse hole,
so it costs no disk; then runs `resize-block-size IN --dry-run` (read every header, validate,
plan every output byte, TP table) and reports its peak RSS, read with os.wait4 by a tiny
wrapper process (see bench.py's MEASURE for why a wrapper).

    python bench/header_memory.py                      # 200,000 tensors
    python bench/header_memory.py --tensors 50000 --tool /work/main/resize_block_size.py

Needs only the standard library.
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = """
import os, sys
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def write_header_only_checkpoint(folder: Path, tensors: int) -> None:
    """config.json and one sparse shard with `tensors` tensors (weights and their scales)."""
    folder.mkdir()
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for i in range(tensors // 2):
        name = f"model.layers.{i // 256}.mlp.experts.{i % 256}.down_proj.weight"
        header[name] = {"dtype": "F8_E4M3", "shape": [256, 256], "data_offsets": [offset, offset + 65536]}
        offset += 65536
        header[name + "_scale_inv"] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [offset, offset + 16]}
        offset += 16
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + offset)          # the data: a hole


def peak_rss_mb(argv: list[str]) -> float:
    result = subprocess.run([sys.executable, "-S", "-c", WRAPPER, *argv], capture_output=True, text=True)
    rss_kib, code = result.stdout.split()[-2:]
    if code != "0":
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stdout[-2000:]}")
    return int(rss_kib) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, default=200_000)
    p.add_argument("--tool", default=str(ROOT / "resize_block_size.py"), help="the module to measure")
    p.add_argument("--workdir", default=None, help="where to build the checkpoint (default: a temp folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = Path(tmp) / "model"
        write_header_only_checkpoint(model, args.tensors)
        header_mb = (model / "model.safetensors").open("rb").read(8)
        header_mb = struct.unpack("<Q", header_mb)[0] / 1e6
        baseline = peak_rss_mb([sys.executable, "-c", "import json, re, struct, hashlib"])
        rss = peak_rss_mb([sys.executable, args.tool, str(model), "--dry-run", "-o", str(Path(tmp) / "out")])
    print(f"{args.tensors} tensors, {header_mb:.1f} MB header: --dry-run peak RSS {rss:.0f} MB "
          f"(a bare interpreter: {baseline:.0f} MB)")


if __name__ == "__main__":
    main()
