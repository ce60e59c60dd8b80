"""Write the tiny DeepSeek-V3 block-FP8 example checkpoint (byte-reproducible).

Usage: python examples/make_tiny_deepseek.py [OUT]   (default: examples/tiny-deepseek-v3)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_checkpoints import (  # noqa: E402
    deepseek_v3_config, deepseek_v3_tensors, default_extra_files, write_checkpoint,
)

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "tiny-deepseek-v3")
for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
    stale.unlink(missing_ok=True)  # a previous run may have used another shard count
write_checkpoint(out, deepseek_v3_tensors(seed=0), deepseek_v3_config(),
                 shards=3, extra_files=default_extra_files())
print(f"wrote {out}")
