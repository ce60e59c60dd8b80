"""Write the tiny DeepSeek-V3 block-FP8 example checkpoint (byte-reproducible).

Usage: python examples/make_tiny_deepseek.py [OUT]   (default: examples/tiny-deepseek-v3)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_checkpoints import (  # noqa: E402
    deepseek_v3_config, deepseek_v3_tensors, default_extra_files, write_checkpoint,
)

# DeepSeek-V3's real sizes for every dim tensor parallelism splits, so the example has the real
# TP table (TP32 needs 64x64: 18432/32 = 576 rows; TP64 needs 32x32: 2048/64 = 32 rows of an
# expert), and tiny sizes for every dim it does not split (hidden 64 instead of 7168), which keeps
# it a few MB. Attention is scaled so its splits never limit the table before the MLPs do:
# 32 heads x (64 nope + 64 rope) = 4096 q_b rows, 32 x (64 + 64 v) = 4096 kv_b rows, 2048 o cols.
DIMS = dict(hidden=64, intermediate=18432, moe_intermediate=2048, num_heads=32,
            nope_dim=64, rope_dim=64, v_dim=64, q_lora_rank=64, kv_lora_rank=128)

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "tiny-deepseek-v3")
for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
    stale.unlink(missing_ok=True)  # a previous run may have used another shard count
write_checkpoint(out, deepseek_v3_tensors(seed=0, **DIMS), deepseek_v3_config(**DIMS),
                 shards=3, extra_files=default_extra_files())
print(f"wrote {out}")
