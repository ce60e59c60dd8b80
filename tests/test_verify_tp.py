"""--verify, the tensor-parallel advisor (--dry-run tables, --tp N) and the checkpoint families.

The TP tables are checked on header-only checkpoints at the published sizes: each shard is a
valid safetensors header declaring real-size tensors, then `os.truncate`d to its full length
(a sparse file: gigabytes of apparent size, no disk). The expected tables are worked out by hand
from the published dims in the comments next to them, not computed with the module's functions.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from conftest import cli, dequantized, deepseek, load_all, read_header, snapshot, tc, write_safetensors


BLOCK_RE = re.compile(r"-Block\d+x\d+$")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

DTYPE_BYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}


def write_header_only(folder: Path, shards: list[dict[str, tuple[str, list[int]]]], config: dict) -> Path:
    """A checkpoint whose shards hold only a header: the data area is a hole (sparse file)."""
    folder.mkdir(parents=True)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, tensors in zip(files, shards):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (dtype, shape) in tensors.items():
            n = math.prod(shape) * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        path = write_safetensors(folder / file, header)
        os.truncate(path, path.stat().st_size + offset)      # the data area: a hole
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def fp8(shape: list[int], scale: list[int], scale_dtype: str = "F32") -> dict[str, tuple[str, list[int]]]:
    """An FP8 `.weight` and its `.weight_scale_inv` (keys are suffixes)."""
    return {".weight": ("F8_E4M3", shape), ".weight_scale_inv": (scale_dtype, scale)}


def add(tensors: dict, prefix: str, parts: dict[str, tuple[str, list[int]]]) -> None:
    for suffix, spec in parts.items():
        tensors[prefix + suffix] = spec


def tensor_spans(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, absolute begin, absolute end) of a safetensors file."""
    _, entries, start = read_header(path)
    return {k: (v["dtype"], v["shape"], start + v["data_offsets"][0], start + v["data_offsets"][1])
            for k, v in entries.items()}


def dry_run_json(folder: Path, *args: object) -> dict:
    result = cli(folder, "--dry-run", "--json", *args, check=True)
    return json.loads(result.stdout)


def siblings(folder: Path) -> set[str]:
    return {p.name for p in folder.parent.iterdir()}


def assert_same_dequantized(a: Path, b: Path) -> None:
    da, db = dequantized(a), dequantized(b)
    assert da.keys() == db.keys() and da
    for name in da:
        assert torch.equal(da[name], db[name]), name


def quant_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


# ---------------------------------------------------------------------------------------------
# --verify
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted_master(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DeepSeek-V3 input and its finished 64x64 output; tests work on copies of the output."""
    base = tmp_path_factory.mktemp("verify")
    src = deepseek(base / "DeepSeek-V3")
    out = base / "master-out"
    cli(src, "-o", out, "-q", check=True)
    return src, out


@pytest.fixture
def good_output(converted_master, tmp_path) -> tuple[Path, Path]:
    src, master = converted_master
    out = tmp_path / "out"
    shutil.copytree(master, out)
    return src, out


def first_tensor(out: Path, want) -> tuple[str, str, tuple]:
    """(shard name, tensor name, header entry) of the first tensor in a later shard matching `want`."""
    for shard in sorted(out.glob("*.safetensors"), reverse=True):
        for name, entry in sorted(tensor_spans(shard).items(), key=lambda kv: kv[1][2]):
            if want(name, entry):
                return shard.name, name, entry
    raise AssertionError("no matching tensor")


def test_verify_passes_on_good_output_and_reports_counts(good_output):
    src, out = good_output
    before = snapshot(out)
    result = cli(src, "-o", out, "--verify")
    assert result.returncode == 0, result.stderr
    m = re.search(r"verified .*: (\d+) tensors byte-identical, (\d+) scales exact replications, "
                  r"(\d+) files equal", result.stdout)
    assert m, result.stdout
    tensors = load_all(src)
    scales = sum(1 for n in tensors if n.endswith("_scale_inv"))
    others = len(tc.default_extra_files())
    assert (int(m[1]), int(m[2]), int(m[3])) == (len(tensors) - scales, scales, others + 2)  # + config, index
    assert snapshot(out) == before


def test_verify_fails_when_one_scale_value_is_changed(good_output):
    src, out = good_output
    shard, name, (dtype, _, begin, _) = first_tensor(
        out, lambda n, e: n.endswith("weight_scale_inv") and e[0] == "F32")
    with open(out / shard, "r+b") as f:
        f.seek(begin)
        (value,) = struct.unpack("<f", f.read(4))
        f.seek(begin)
        f.write(struct.pack("<f", value * 2))
    before = snapshot(out)
    result = cli(src, "-o", out, "--verify")
    assert result.returncode != 0
    assert re.search(rf"{re.escape(shard)}: {re.escape(name)}: scale values", result.stderr), result.stderr
    assert snapshot(out) == before, "a failing --verify must not rewrite the output"


def test_verify_fails_when_one_fp8_byte_is_flipped(good_output):
    src, out = good_output
    shard, name, (_, _, begin, end) = first_tensor(out, lambda n, e: e[0] == "F8_E4M3")
    at = (end - begin) // 2 + 3
    with open(out / shard, "r+b") as f:
        f.seek(begin + at)
        byte = f.read(1)[0]
        f.seek(begin + at)
        f.write(bytes([byte ^ 0x01]))
    before = snapshot(out)
    result = cli(src, "-o", out, "--verify")
    assert result.returncode != 0
    assert f"{shard}: {name}: byte {at} differs" in result.stderr, result.stderr
    assert snapshot(out) == before, "a failing --verify must not rewrite the output"


def test_verify_fails_when_an_output_shard_is_truncated(good_output):
    src, out = good_output
    shard = sorted(out.glob("*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 100)
    before = snapshot(out)
    result = cli(src, "-o", out, "--verify")
    assert result.returncode != 0
    assert re.search(rf"verify: {re.escape(shard.name)}: .*truncated", result.stderr), result.stderr
    assert snapshot(out) == before, "a failing --verify must not rewrite the output"


@pytest.mark.parametrize("missing", ["tokenizer.json", "figures/benchmark.png"])
def test_verify_fails_when_a_copied_file_is_missing(good_output, missing):
    src, out = good_output
    (out / missing).unlink()
    before = snapshot(out)
    result = cli(src, "-o", out, "--verify")
    assert result.returncode != 0
    assert f"verify: {missing}: missing" in result.stderr, result.stderr
    assert not (out / missing).exists(), "a failing --verify must not re-copy files"
    assert snapshot(out) == before


def test_verify_fails_naming_config_json_when_it_is_missing(good_output):
    # Everything else is complete: --verify must report the missing file, not refuse the folder as
    # someone else's ("exists and is not empty; choose a new or empty folder").
    src, out = good_output
    (out / "config.json").unlink()
    before = snapshot(out)
    result = cli(src, "-o", out, "--verify")
    assert result.returncode != 0
    assert "config.json" in result.stderr, result.stderr
    assert not (out / "config.json").exists() and snapshot(out) == before


def test_verify_on_a_missing_output_converts_then_verifies(ckpt, tmp_path):
    out = tmp_path / "fresh"
    result = cli(ckpt, "-o", out, "--verify")
    assert result.returncode == 0, result.stderr
    assert "converted " in result.stdout and f"verified {out}" in result.stdout
    assert quant_config(out)["weight_block_size"] == [64, 64]
    assert_same_dequantized(ckpt, out)


# ---------------------------------------------------------------------------------------------
# TP tables from header-only checkpoints at the published sizes
# ---------------------------------------------------------------------------------------------

def deepseek_v3_real(folder: Path) -> Path:
    """DeepSeek-V3 at its published dims (reference doc section 5): dense layer 0, MoE layer 3
    (3 routed experts + the shared expert), embeddings and head. F32 scales, 128x128."""
    h, inter, moe, q_lora, kv_lora, rope, heads, nope, v = 7168, 18432, 2048, 1536, 512, 64, 128, 128, 128
    vocab = 129280
    first: dict = {"model.embed_tokens.weight": ("BF16", [vocab, h])}
    second: dict = {}

    def attn(t: dict, p: str) -> None:
        add(t, f"{p}.q_a_proj", fp8([q_lora, h], [12, 56]))                                 # [1536,7168]
        t[f"{p}.q_a_layernorm.weight"] = ("BF16", [q_lora])
        add(t, f"{p}.q_b_proj", fp8([heads * (nope + rope), q_lora], [192, 12]))            # [24576,1536]
        add(t, f"{p}.kv_a_proj_with_mqa", fp8([kv_lora + rope, h], [5, 56]))                # [576,7168]
        t[f"{p}.kv_a_layernorm.weight"] = ("BF16", [kv_lora])
        add(t, f"{p}.kv_b_proj", fp8([heads * (nope + v), kv_lora], [256, 4]))              # [32768,512]
        add(t, f"{p}.o_proj", fp8([h, heads * v], [56, 128]))                               # [7168,16384]

    def mlp(t: dict, p: str, n: int) -> None:
        s = -(-n // 128)
        add(t, f"{p}.gate_proj", fp8([n, h], [s, 56]))
        add(t, f"{p}.up_proj", fp8([n, h], [s, 56]))
        add(t, f"{p}.down_proj", fp8([h, n], [56, s]))

    for i, t in ((0, first), (3, second)):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = ("BF16", [h])
        attn(t, f"{p}.self_attn")
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", [h])
    mlp(first, "model.layers.0.mlp", inter)
    second["model.layers.3.mlp.gate.weight"] = ("BF16", [256, h])
    second["model.layers.3.mlp.gate.e_score_correction_bias"] = ("F32", [256])
    for e in range(3):
        mlp(second, f"model.layers.3.mlp.experts.{e}", moe)
    mlp(second, "model.layers.3.mlp.shared_experts", moe)
    second["model.norm.weight"] = ("BF16", [h])
    second["lm_head.weight"] = ("BF16", [vocab, h])
    config = tc.deepseek_v3_config(hidden=h, intermediate=inter, moe_intermediate=moe, n_routed_experts=256,
                                   num_layers=61, first_k_dense=3, num_heads=heads, q_lora_rank=q_lora,
                                   kv_lora_rank=kv_lora, rope_dim=rope, nope_dim=nope, v_dim=v, vocab=vocab)
    return write_header_only(folder, [first, second], config)


def qwen3_moe_real(folder: Path, *, hidden: int, heads: int, kv_heads: int, moe: int, experts: int) -> Path:
    """A Qwen3-MoE-FP8 at published dims (head_dim 128, BF16 scales): layer 0 with 2 experts."""
    hd, vocab = 128, 151936
    t: dict = {"model.embed_tokens.weight": ("BF16", [vocab, hidden])}
    p = "model.layers.0"
    t[f"{p}.input_layernorm.weight"] = ("BF16", [hidden])
    a = f"{p}.self_attn"
    add(t, f"{a}.q_proj", fp8([heads * hd, hidden], [heads * hd // 128, hidden // 128], "BF16"))
    add(t, f"{a}.k_proj", fp8([kv_heads * hd, hidden], [kv_heads * hd // 128, hidden // 128], "BF16"))
    add(t, f"{a}.v_proj", fp8([kv_heads * hd, hidden], [kv_heads * hd // 128, hidden // 128], "BF16"))
    add(t, f"{a}.o_proj", fp8([hidden, heads * hd], [hidden // 128, heads * hd // 128], "BF16"))
    t[f"{a}.q_norm.weight"] = ("BF16", [hd])
    t[f"{a}.k_norm.weight"] = ("BF16", [hd])
    t[f"{p}.post_attention_layernorm.weight"] = ("BF16", [hidden])
    t[f"{p}.mlp.gate.weight"] = ("BF16", [experts, hidden])
    for e in range(2):
        x = f"{p}.mlp.experts.{e}"
        add(t, f"{x}.gate_proj", fp8([moe, hidden], [moe // 128, hidden // 128], "BF16"))
        add(t, f"{x}.up_proj", fp8([moe, hidden], [moe // 128, hidden // 128], "BF16"))
        add(t, f"{x}.down_proj", fp8([hidden, moe], [hidden // 128, moe // 128], "BF16"))
    t["model.norm.weight"] = ("BF16", [hidden])
    t["lm_head.weight"] = ("BF16", [vocab, hidden])
    config = tc.qwen3_moe_config(hidden=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
                                 moe_intermediate=moe, n_experts=experts, num_layers=1, vocab=vocab)
    return write_header_only(folder, [t], config)


@pytest.fixture(scope="module")
def real_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("real")
    return {
        "DeepSeek-V3": deepseek_v3_real(base / "DeepSeek-V3"),
        "Qwen3-235B-A22B": qwen3_moe_real(base / "Qwen3-235B-A22B-FP8", hidden=4096, heads=64, kv_heads=4,
                                          moe=1536, experts=128),
        "Qwen3-30B-A3B": qwen3_moe_real(base / "Qwen3-30B-A3B-FP8", hidden=2048, heads=32, kv_heads=4,
                                        moe=768, experts=128),
    }


@pytest.fixture(scope="module")
def real_plans(real_models) -> dict[str, dict]:
    """`--dry-run --json` of each real-size model, with the folder listing around it."""
    plans = {}
    for name, folder in real_models.items():
        before = siblings(folder)
        info = dry_run_json(folder)
        plans[name] = {**info, "_siblings_before": before, "_siblings_after": siblings(folder)}
    return plans


# Largest square block (128, 64, 32, 16, dividing 128) such that every split dim per rank is a
# multiple of it; None when not even 16 works (or a dim does not split evenly).
#
# DeepSeek-V3 (column-parallel = rows split, row-parallel = columns split; q_a_proj and
# kv_a_proj_with_mqa are replicated):
#   q_b_proj rows 128*(128+64) = 24576: /16 = 1536, /32 = 768, /64 = 384   -> all multiples of 128
#   kv_b_proj rows 128*(128+128) = 32768: /64 = 512                         -> 128
#   o_proj cols 128*128 = 16384: /64 = 256                                 -> 128
#   dense gate/up rows, down cols 18432: /8 = 2304 = 18*128, /16 = 1152 = 9*128 -> 128,
#                                       /32 = 576 = 9*64 (4.5*128)          -> 64,
#                                       /64 = 288 = 9*32 (4.5*64)           -> 32
#   routed + shared experts 2048: /16 = 128 -> 128, /32 = 64 -> 64, /64 = 32 -> 32
# With EP the routed experts are not split, but the dense MLP (18432) and the shared expert
# (2048) still are, so the table is the same.
DEEPSEEK_V3_TP = {"1": 128, "2": 128, "4": 128, "8": 128, "16": 128, "32": 64, "64": 32}
DEEPSEEK_V3_TP_EP = DEEPSEEK_V3_TP

# Qwen3-235B-A22B (hidden 4096, 64 heads, 4 KV heads, head_dim 128, moe_intermediate 1536):
#   q_proj rows 64*128 = 8192: /64 = 128                                 -> 128 at every TP
#   k/v_proj rows 4*128 = 512, split over min(TP, 4): 512, 256, then 128 -> 128
#   o_proj cols 8192: /64 = 128                                          -> 128
#   experts 1536 = 12*128: /1 = 1536, /2 = 768 = 6*128, /4 = 384 = 3*128 -> 128
#                          /8 = 192 = 3*64                                -> 64
#                          /16 = 96 = 3*32                                -> 32
#                          /32 = 48 = 3*16                                -> 16
#                          /64 = 24, not a multiple of 16                 -> None
# With EP only attention is split: 128 everywhere.
QWEN3_235B_TP = {"1": 128, "2": 128, "4": 128, "8": 64, "16": 32, "32": 16, "64": None}
QWEN3_235B_TP_EP = {"1": 128, "2": 128, "4": 128, "8": 128, "16": 128, "32": 128, "64": 128}

# Qwen3-30B-A3B (hidden 2048, 32 heads, 4 KV heads, head_dim 128, moe_intermediate 768):
#   q_proj rows / o_proj cols 32*128 = 4096: /32 = 128 -> 128, /64 = 64 -> 64
#   k/v_proj rows 512 over min(TP, 4) ranks: >= 128                      -> 128
#   experts 768 = 6*128: /1 = 768, /2 = 384 = 3*128                      -> 128
#                        /4 = 192 = 3*64                                 -> 64
#                        /8 = 96 = 3*32                                  -> 32
#                        /16 = 48 = 3*16                                 -> 16
#                        /32 = 24, /64 = 12: not multiples of 16         -> None
# With EP only attention is split: 128 up to TP32, 64 at TP64 (4096/64 = 64).
QWEN3_30B_TP = {"1": 128, "2": 128, "4": 64, "8": 32, "16": 16, "32": None, "64": None}
QWEN3_30B_TP_EP = {"1": 128, "2": 128, "4": 128, "8": 128, "16": 128, "32": 128, "64": 64}


@pytest.mark.parametrize("model, tp, tp_ep", [
    ("DeepSeek-V3", DEEPSEEK_V3_TP, DEEPSEEK_V3_TP_EP),
    ("Qwen3-235B-A22B", QWEN3_235B_TP, QWEN3_235B_TP_EP),
    ("Qwen3-30B-A3B", QWEN3_30B_TP, QWEN3_30B_TP_EP),
], ids=["DeepSeek-V3", "Qwen3-235B-A22B", "Qwen3-30B-A3B"])
def test_dry_run_tp_table_matches_hand_computed_at_real_sizes(real_plans, model, tp, tp_ep):
    info = real_plans[model]
    assert info["tp"] == tp
    assert info["tp_ep"] == tp_ep
    assert info["tp_unknown_weights"] == []


def test_header_only_checkpoints_are_sparse(real_models):
    # Sanity of the fixture itself: gigabytes declared, (almost) nothing on disk.
    shard = sorted(real_models["DeepSeek-V3"].glob("*.safetensors"))[0]
    st = shard.stat()
    assert st.st_size > 1_000_000_000
    assert st.st_blocks * 512 < 10_000_000


def test_dry_run_json_reports_blocks_shards_scales_and_bytes(real_plans, real_models):
    info = real_plans["DeepSeek-V3"]
    assert info["source_block"] == [128, 128]
    assert info["target_block"] == [64, 64]
    assert type(info["shards"]) is int and info["shards"] == 2
    # layer 0: q_a, q_b, kv_a, kv_b, o, gate, up, down = 8; layer 3: 5 attention + (3 experts + shared) * 3 = 17
    assert type(info["scales"]) is int and info["scales"] == 25
    assert type(info["bytes_out"]) is int
    # Data bytes of the output: every input tensor, with the scales at the 64x64 shapes (4 bytes each).
    folder = real_models["DeepSeek-V3"]
    data_in = sum(e[3] - e[2] for s in folder.glob("*.safetensors") for e in tensor_spans(s).values())
    scale_in = sum(e[3] - e[2] for s in folder.glob("*.safetensors")
                   for n, e in tensor_spans(s).items() if n.endswith("_scale_inv"))
    # attention (x2 layers): q_a [24,112], q_b [384,24], kv_a [9,112], kv_b [512,8], o [112,256];
    # dense gate/up [288,112], down [112,288]; 4 expert MLPs gate/up [32,112], down [112,32].
    scale_out = 4 * (24 * 112 + 384 * 24 + 9 * 112 + 512 * 8 + 112 * 256) * 2 \
        + 4 * (288 * 112 * 2 + 112 * 288) + 4 * (32 * 112 * 2 + 112 * 32) * 4
    small = len((folder / "config.json").read_bytes()) + len((folder / "model.safetensors.index.json").read_bytes())
    overhead = info["bytes_out"] - (data_in - scale_in + scale_out) - small
    assert 0 < overhead < 2 * 64_000, overhead        # two shard headers (JSON + alignment padding)


def test_dry_run_scale_shapes_match_published_64x64_targets(real_plans):
    # Reference doc section 5: q_a [24,112], q_b [384,24], kv_a [9,112], kv_b [512,8], o_proj [112,256],
    # dense [288,112]/[112,288], experts [32,112]/[112,32].
    got = {(tuple(e["scale_before"]), tuple(e["scale_after"])) for e in real_plans["DeepSeek-V3"]["scale_examples"]}
    assert got == {((12, 56), (24, 112)), ((192, 12), (384, 24)), ((5, 56), (9, 112)), ((256, 4), (512, 8)),
                   ((56, 128), (112, 256)), ((144, 56), (288, 112)), ((56, 144), (112, 288)),
                   ((16, 56), (32, 112)), ((56, 16), (112, 32))}


def test_dry_run_writes_nothing(real_plans, ckpt):
    for info in real_plans.values():
        assert not Path(info["output"]).exists()
        assert info["_siblings_after"] == info["_siblings_before"]
    before, files = siblings(ckpt), snapshot(ckpt)
    out = ckpt.parent / "explicit-out"
    dry_run_json(ckpt, "-o", out)
    info = dry_run_json(ckpt, "--block-size", 32)
    assert info["output"].endswith("-Block32x32") and not Path(info["output"]).exists()
    assert not out.exists()
    assert siblings(ckpt) == before and snapshot(ckpt) == files


def test_dry_run_bytes_out_equals_what_conversion_writes(ckpt, tmp_path):
    out = tmp_path / "out"
    info = dry_run_json(ckpt, "-o", out)
    cli(ckpt, "-o", out, "-q", check=True)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert info["bytes_out"] == written
    assert info["shards"] == len(list(out.glob("*.safetensors")))
    assert info["scales"] == sum(1 for n in load_all(out) if n.endswith("_scale_inv"))


# ---------------------------------------------------------------------------------------------
# --tp N
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp_ckpt(tmp_path_factory) -> Path:
    """DeepSeek-shaped, with every tensor-parallel dim an odd multiple of 2048 or a multiple of
    4096, so TP16 works at 128, TP32 needs 64 and TP64 needs 32:
      q_b_proj rows 64 heads * (32 + 64) = 6144: /16 = 384 (3*128), /32 = 192 (3*64), /64 = 96 (3*32)
      kv_b_proj rows 64 * (32 + 32) = 4096:       /32 = 128,         /64 = 64
      o_proj cols 64 * 32 = 2048:                 /16 = 128, /32 = 64, /64 = 32
      dense intermediate 6144 (like 18432 = 9*2048): as q_b_proj
      moe_intermediate 2048 (the real one), routed and shared experts: as o_proj
    """
    dims = dict(intermediate=6144, moe_intermediate=2048, num_heads=64, mtp=False)
    return deepseek(tmp_path_factory.mktemp("tp") / "DeepSeek-TP", **dims)


@pytest.mark.parametrize("tp, edge", [(32, 64), (64, 32)])
def test_tp_converts_to_the_block_it_needs(tp_ckpt, tp, edge):
    result = cli(tp_ckpt, "--tp", tp)
    assert result.returncode == 0, result.stderr
    assert f"TP{tp} needs {edge}x{edge} blocks" in result.stdout
    out = tp_ckpt.with_name(f"{tp_ckpt.name}-Block{edge}x{edge}")
    assert out.is_dir()
    assert quant_config(out)["weight_block_size"] == [edge, edge]
    t = load_all(out)
    # q_b_proj [6144, 64]: scale grid ceil(6144/edge) x ceil(64/edge)
    assert list(t["model.layers.0.self_attn.q_b_proj.weight_scale_inv"].shape) == [6144 // edge, -(-64 // edge)]
    assert_same_dequantized(tp_ckpt, out)


def test_tp_where_source_blocks_already_work_writes_nothing(real_models):
    folder = real_models["DeepSeek-V3"]
    before = siblings(folder)
    result = cli(folder, "--tp", 16)
    assert result.returncode == 0, result.stderr
    assert "128x128 blocks already load at TP16" in result.stdout
    assert "nothing to convert" in result.stdout
    assert siblings(folder) == before


def test_tp_with_no_working_block_fails_naming_a_weight(ckpt):
    # The default tiny checkpoint has dims of 192 and 64: at TP64 that is 3 or 1 per rank.
    before = siblings(ckpt)
    result = cli(ckpt, "--tp", 64)
    assert result.returncode != 0
    assert re.search(r"no block size of 16 or more works at TP64: model\.layers\.\d+\.[\w.]+\.weight: \d+ ",
                     result.stderr), result.stderr
    assert siblings(ckpt) == before


def test_tp_together_with_block_size_is_refused(ckpt):
    before = siblings(ckpt)
    result = cli(ckpt, "--tp", 32, "--block-size", 64)
    assert result.returncode != 0
    assert "--tp" in result.stderr and "--block-size" in result.stderr
    assert siblings(ckpt) == before


# ---------------------------------------------------------------------------------------------
# Families: one fixture each; converted once with --verify, then inspected
# ---------------------------------------------------------------------------------------------

def deepseek_v32_tensors() -> dict[str, torch.Tensor]:
    """DeepSeek-V3.2: the V3.1 layout (power-of-two scales) plus the lightning indexer in every
    attention block: FP8 wq_b (+ scale), BF16 wk, weights_proj, k_norm."""
    q_lora, hidden, n_heads, head_dim = 64, 128, 4, 64
    base = tc.deepseek_v3_tensors(power_of_two_scales=True)
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(32)
    for name, t in base.items():
        out[name] = t
        m = re.fullmatch(r"(model\.layers\.\d+\.self_attn)\.o_proj\.weight_scale_inv", name)
        if m:
            p = f"{m[1]}.indexer"
            w = (torch.randn(n_heads * head_dim, q_lora, generator=g) * 0.02).bfloat16()
            out[f"{p}.wq_b.weight"], out[f"{p}.wq_b.weight_scale_inv"] = tc.quantize_block_fp8(
                w, (128, 128), torch.float32, power_of_two_scales=True)
            out[f"{p}.wk.weight"] = (torch.randn(head_dim, hidden, generator=g) * 0.02).bfloat16()
            out[f"{p}.weights_proj.weight"] = (torch.randn(n_heads, hidden, generator=g) * 0.02).bfloat16()
            out[f"{p}.k_norm.weight"] = torch.ones(head_dim, dtype=torch.bfloat16)
            out[f"{p}.k_norm.bias"] = torch.zeros(head_dim, dtype=torch.bfloat16)
    return out


def deepseek_v32_config() -> dict:
    cfg = tc.deepseek_v3_config(scale_fmt="ue8m0")
    cfg.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32",
               index_n_heads=4, index_head_dim=64, index_topk=2048)
    return cfg


FAMILIES = {
    "deepseek-v3": lambda d: deepseek(d),
    "deepseek-v3.1": lambda d: tc.write_checkpoint(
        d, tc.deepseek_v3_tensors(power_of_two_scales=True), tc.deepseek_v3_config(scale_fmt="ue8m0"),
        extra_files=tc.default_extra_files()),
    "deepseek-v3.2": lambda d: tc.write_checkpoint(d, deepseek_v32_tensors(), deepseek_v32_config()),
    "kimi-k2": lambda d: tc.write_checkpoint(
        d, tc.kimi_k2_tensors(n_routed_experts=8), tc.kimi_k2_config(n_routed_experts=8), shards=4),
    "qwen3-dense": lambda d: tc.write_checkpoint(
        d, tc.qwen3_dense_tensors(scale_dtype=torch.float16), tc.qwen3_dense_config(), shards=2),
    "qwen3-moe": lambda d: tc.write_checkpoint(d, tc.qwen3_moe_tensors(), tc.qwen3_moe_config(), shards=2),
    "minimax-m2": lambda d: tc.write_checkpoint(d, tc.minimax_m2_tensors(), tc.minimax_m2_config(), single_file=True),
}


class Family:
    def __init__(self, src: Path, out: Path, result):
        self.src, self.out, self.result = src, out, result


@pytest.fixture(scope="module")
def family_cache(tmp_path_factory):
    base = tmp_path_factory.mktemp("families")
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            src = FAMILIES[name](base / name)
            out = base / f"{name}-out"
            cache[name] = Family(src, out, cli(src, "-o", out, "--verify"))
        return cache[name]
    return get


@pytest.fixture
def deepseek_v3(family_cache): return family_cache("deepseek-v3")
@pytest.fixture
def deepseek_v31(family_cache): return family_cache("deepseek-v3.1")
@pytest.fixture
def deepseek_v32(family_cache): return family_cache("deepseek-v3.2")
@pytest.fixture
def kimi_k2(family_cache): return family_cache("kimi-k2")
@pytest.fixture
def qwen3_dense(family_cache): return family_cache("qwen3-dense")
@pytest.fixture
def qwen3_moe(family_cache): return family_cache("qwen3-moe")
@pytest.fixture
def minimax_m2(family_cache): return family_cache("minimax-m2")


FAMILY_FIXTURES = ["deepseek_v3", "deepseek_v31", "deepseek_v32", "kimi_k2", "qwen3_dense", "qwen3_moe", "minimax_m2"]


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_family_converts_and_verify_passes(request, family):
    fam: Family = request.getfixturevalue(family)
    assert fam.result.returncode == 0, fam.result.stderr
    assert f"verified {fam.out}" in fam.result.stdout
    assert quant_config(fam.out)["weight_block_size"] == [64, 64]
    assert_same_dequantized(fam.src, fam.out)


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_family_config_changes_only_weight_block_size(request, family):
    fam: Family = request.getfixturevalue(family)
    before = json.loads((fam.src / "config.json").read_text())
    after = json.loads((fam.out / "config.json").read_text())
    before["quantization_config"]["weight_block_size"] = [64, 64]
    assert after == before


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_family_dry_run_has_no_unknown_weights(request, family):
    fam: Family = request.getfixturevalue(family)
    info = dry_run_json(fam.src, "-o", fam.src.parent / f"{fam.src.name}-dry")
    assert info["tp_unknown_weights"] == []
    assert list(info["tp"]) == ["1", "2", "4", "8", "16", "32", "64"]


def test_deepseek_v31_keeps_scale_fmt_ue8m0(deepseek_v31):
    assert quant_config(deepseek_v31.src)["scale_fmt"] == "ue8m0"
    assert quant_config(deepseek_v31.out)["scale_fmt"] == "ue8m0"


def test_deepseek_v31_power_of_two_scales_stay_powers_of_two(deepseek_v31):
    for folder in (deepseek_v31.src, deepseek_v31.out):
        scales = [t for n, t in load_all(folder).items() if n.endswith("_scale_inv")]
        assert scales
        for s in scales:
            mantissa, _ = torch.frexp(s)
            assert torch.all(mantissa == 0.5), folder


def test_deepseek_v32_indexer_tensors(deepseek_v32):
    src, out = load_all(deepseek_v32.src), load_all(deepseek_v32.out)
    cfg = json.loads((deepseek_v32.out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32"
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    for i in range(3):                        # layers 0, 1 and the MTP layer 2
        p = f"model.layers.{i}.self_attn.indexer"
        # wq_b [256, 64]: 128x128 scale [2, 1] -> 64x64 [4, 1]
        assert list(src[f"{p}.wq_b.weight_scale_inv"].shape) == [2, 1]
        assert list(out[f"{p}.wq_b.weight_scale_inv"].shape) == [4, 1]
        for n in ("wk.weight", "weights_proj.weight", "k_norm.weight", "k_norm.bias", "wq_b.weight"):
            assert out[f"{p}.{n}"].dtype == src[f"{p}.{n}"].dtype
            assert torch.equal(out[f"{p}.{n}"].view(torch.uint8), src[f"{p}.{n}"].view(torch.uint8)), n


def test_kimi_k2_has_no_mtp_and_all_experts_resized(kimi_k2):
    out = load_all(kimi_k2.out)
    assert not any(n.startswith("model.layers.2.") for n in out)
    assert json.loads((kimi_k2.out / "config.json").read_text())["model_type"] == "kimi_k2"
    for e in range(8):
        # experts gate/up [64, 128] -> scale [1, 2] at 64x64, down [128, 64] -> [2, 1]
        assert list(out[f"model.layers.1.mlp.experts.{e}.gate_proj.weight_scale_inv"].shape) == [1, 2]
        assert list(out[f"model.layers.1.mlp.experts.{e}.down_proj.weight_scale_inv"].shape) == [2, 1]


def test_qwen3_dense_f16_scales_stay_f16(qwen3_dense):
    for folder in (qwen3_dense.src, qwen3_dense.out):
        scales = {n: t for n, t in load_all(folder).items() if n.endswith("_scale_inv")}
        assert scales and all(t.dtype == torch.float16 for t in scales.values())
    # q_proj 3 heads * 64 = 192 rows, hidden 128: [2, 1] -> [3, 2]
    assert list(load_all(qwen3_dense.out)["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape) == [3, 2]


def test_qwen3_moe_keeps_bf16_scales_modules_to_not_convert_and_no_fmt(qwen3_moe):
    before, after = quant_config(qwen3_moe.src), quant_config(qwen3_moe.out)
    assert after["modules_to_not_convert"] == before["modules_to_not_convert"]
    assert "mlp.gate" in " ".join(after["modules_to_not_convert"])
    assert "fmt" not in after
    scales = [t for n, t in load_all(qwen3_moe.out).items() if n.endswith("_scale_inv")]
    assert scales and all(t.dtype == torch.bfloat16 for t in scales)


def test_minimax_m2_keeps_fmt_and_w1_w2_w3_names(minimax_m2):
    assert quant_config(minimax_m2.out)["fmt"] == "float8_e4m3fn"
    out = load_all(minimax_m2.out)
    for w in ("w1", "w2", "w3"):
        assert f"model.layers.0.block_sparse_moe.experts.0.{w}.weight_scale_inv" in out


# ---------------------------------------------------------------------------------------------
# compressed-tensors FP8_BLOCK (converted: tests/test_families.py)
# ---------------------------------------------------------------------------------------------

def test_weight_scale_tensors_under_an_fp8_config_are_refused_naming_compressed_tensors(tmp_path):
    # The same compressed-tensors shards with a quant_method "fp8" config (e.g. hand-edited).
    tensors = {(n[: -len("_inv")] if n.endswith("weight_scale_inv") else n): t
               for n, t in tc.qwen3_dense_tensors().items()}
    src = tc.write_checkpoint(tmp_path / "Qwen3-0.6B-FP8-BLOCK", tensors, tc.qwen3_dense_config(), shards=2)
    result = cli(src)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "compressed-tensors" in lines[0] and ".weight_scale_inv" in lines[0], result.stderr
    assert siblings(src) == {src.name}
