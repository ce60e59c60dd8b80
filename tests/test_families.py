"""The 2026 families: Qwen3.5/3.6 (hybrid attention, multimodal config), Qwen3-Next, GLM-5.x (DSA
indexer), MiniMax-M2, compressed-tensors FP8_BLOCK, and the checkpoints that must be refused
(DeepSeek-V4/V4.1, block-FP8 mixed with MXFP4/NVFP4).

TP tables come from header-only checkpoints at the published dims (sparse files: real shapes,
no data). The expected tables are worked out by hand in the comments from the engines' split
rules (SGLang/vLLM model files: column-parallel projections split their rows, row-parallel ones
their columns, merged column-parallel weights split each part separately, replicated layers not
at all, KV heads replicated beyond their count, routed experts not split under EP while shared
experts are). Conversions are checked against torch dequantization of the input.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import cli, load_all, snapshot, tc
from test_verify_tp import add, dry_run_json, fp8, siblings, write_header_only


def fp8b(n: int, k: int, scale_dtype: str = "BF16") -> dict:
    """An FP8 [n, k] weight with its 128x128 scale [ceil(n/128), ceil(k/128)]."""
    return fp8([n, k], [math.ceil(n / 128), math.ceil(k / 128)], scale_dtype)


# ---------------------------------------------------------------------------------------------
# Header-only checkpoints at the published dims
# ---------------------------------------------------------------------------------------------

def qwen3_5_real(folder: Path, *, hidden: int, heads: int, kv_heads: int, key_heads: int, value_heads: int,
                 moe: int, shared: int, experts: int, vocab: int = 248320) -> Path:
    """Qwen3.5/3.6-MoE-FP8 (Qwen3_5MoeForConditionalGeneration): linear-attention layer 0,
    full-attention layer 3, the MTP layer, and a BF16 vision block. head_dim 256, linear head
    dims 128, BF16 scales."""
    hd, lk = 256, 128
    key_dim, value_dim = key_heads * lk, value_heads * lk
    t: dict = {"model.language_model.embed_tokens.weight": ("BF16", [vocab, hidden])}

    def moe_block(p: str) -> None:
        t[f"{p}.gate.weight"] = ("BF16", [experts, hidden])
        for e in range(2):
            for proj, (n, k) in (("gate_proj", (moe, hidden)), ("up_proj", (moe, hidden)), ("down_proj", (hidden, moe))):
                add(t, f"{p}.experts.{e}.{proj}", fp8b(n, k))
        for proj, (n, k) in (("gate_proj", (shared, hidden)), ("up_proj", (shared, hidden)), ("down_proj", (hidden, shared))):
            add(t, f"{p}.shared_expert.{proj}", fp8b(n, k))
        t[f"{p}.shared_expert_gate.weight"] = ("BF16", [1, hidden])

    def full_attn(p: str) -> None:
        add(t, f"{p}.q_proj", fp8b(2 * heads * hd, hidden))       # query + output gate
        add(t, f"{p}.k_proj", fp8b(kv_heads * hd, hidden))
        add(t, f"{p}.v_proj", fp8b(kv_heads * hd, hidden))
        add(t, f"{p}.o_proj", fp8b(hidden, heads * hd))
        t[f"{p}.q_norm.weight"] = ("BF16", [hd])
        t[f"{p}.k_norm.weight"] = ("BF16", [hd])

    p = "model.language_model.layers.0"
    t[f"{p}.input_layernorm.weight"] = ("BF16", [hidden])
    a = f"{p}.linear_attn"
    add(t, f"{a}.in_proj_qkv", fp8b(2 * key_dim + value_dim, hidden))
    add(t, f"{a}.in_proj_z", fp8b(value_dim, hidden))
    t[f"{a}.in_proj_b.weight"] = ("BF16", [value_heads, hidden])
    t[f"{a}.in_proj_a.weight"] = ("BF16", [value_heads, hidden])
    t[f"{a}.conv1d.weight"] = ("BF16", [2 * key_dim + value_dim, 1, 4])
    t[f"{a}.A_log"] = ("F32", [value_heads])
    t[f"{a}.dt_bias"] = ("BF16", [value_heads])
    t[f"{a}.norm.weight"] = ("F32", [lk])
    add(t, f"{a}.out_proj", fp8b(hidden, value_dim))
    moe_block(f"{p}.mlp")
    full_attn("model.language_model.layers.3.self_attn")
    moe_block("model.language_model.layers.3.mlp")
    t["mtp.fc.weight"] = ("BF16", [hidden, 2 * hidden])
    full_attn("mtp.layers.0.self_attn")
    moe_block("mtp.layers.0.mlp")
    t["model.visual.blocks.0.attn.qkv.weight"] = ("BF16", [3 * 1152, 1152])
    t["model.visual.blocks.0.mlp.linear_fc1.weight"] = ("BF16", [4304, 1152])
    t["lm_head.weight"] = ("BF16", [vocab, hidden])
    config = tc.qwen3_5_moe_config(hidden=hidden, num_layers=40, num_heads=heads, num_kv_heads=kv_heads,
                                   head_dim=hd, linear_key_heads=key_heads, linear_key_head_dim=lk,
                                   linear_value_heads=value_heads, linear_value_head_dim=lk, n_experts=experts,
                                   moe_intermediate=moe, shared_intermediate=shared, vocab=vocab)
    return write_header_only(folder, [t], config)


def qwen3_next_real(folder: Path) -> Path:
    """Qwen3-Next-80B-A3B-FP8: fused in_proj_qkvz [2*2048 + 2*4096, 2048] and in_proj_ba on disk,
    hidden 2048, 16 heads x 256 (2 KV heads), linear 16 key / 32 value heads x 128, 512 experts of
    512, shared expert 512. Config settings at the top level."""
    hidden, hd, key_dim, value_dim, moe = 2048, 256, 16 * 128, 32 * 128, 512
    t: dict = {"model.embed_tokens.weight": ("BF16", [151936, hidden])}
    a = "model.layers.0.linear_attn"
    add(t, f"{a}.in_proj_qkvz", fp8b(2 * key_dim + 2 * value_dim, hidden))
    t[f"{a}.in_proj_ba.weight"] = ("BF16", [2 * 32, hidden])
    add(t, f"{a}.out_proj", fp8b(hidden, value_dim))
    s = "model.layers.3.self_attn"
    add(t, f"{s}.q_proj", fp8b(2 * 16 * hd, hidden))
    add(t, f"{s}.k_proj", fp8b(2 * hd, hidden))
    add(t, f"{s}.v_proj", fp8b(2 * hd, hidden))
    add(t, f"{s}.o_proj", fp8b(hidden, 16 * hd))
    m = "model.layers.3.mlp"
    for proj, (n, k) in (("gate_proj", (moe, hidden)), ("up_proj", (moe, hidden)), ("down_proj", (hidden, moe))):
        add(t, f"{m}.experts.0.{proj}", fp8b(n, k))
        add(t, f"{m}.shared_expert.{proj}", fp8b(n, k))
    config = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": hidden,
              "head_dim": hd, "num_attention_heads": 16, "num_key_value_heads": 2, "linear_num_key_heads": 16,
              "linear_key_head_dim": 128, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
              "num_experts": 512, "moe_intermediate_size": moe, "shared_expert_intermediate_size": moe,
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}}
    return write_header_only(folder, [t], config)


def glm5_1_real(folder: Path) -> Path:
    """GLM-5.1-FP8: hidden 6144, dense 12288 (layer 0), 256 experts of 2048 + one shared expert,
    64 heads, q_lora 2048, kv_lora 512, qk_nope 192, rope 64, v_head 256, indexer 32 heads x 128
    (FP8 wq_b [4096, 2048], wk [128, 6144]; BF16 weights_proj), MTP layer 78 with eh_proj. F32 scales."""
    h, dense, moe, heads, q_lora, kv_lora, nope, rope, v = 6144, 12288, 2048, 64, 2048, 512, 192, 64, 256

    def f(n: int, k: int) -> dict:
        return fp8b(n, k, "F32")

    shards: list[dict] = []
    for i in (0, 3, 78):
        t: dict = {}
        p = f"model.layers.{i}"
        s = f"{p}.self_attn"
        add(t, f"{s}.q_a_proj", f(q_lora, h))
        add(t, f"{s}.q_b_proj", f(heads * (nope + rope), q_lora))
        add(t, f"{s}.kv_a_proj_with_mqa", f(kv_lora + rope, h))
        add(t, f"{s}.kv_b_proj", f(heads * (nope + v), kv_lora))
        add(t, f"{s}.o_proj", f(h, heads * v))
        add(t, f"{s}.indexer.wq_b", f(32 * 128, q_lora))
        add(t, f"{s}.indexer.wk", f(128, h))
        t[f"{s}.indexer.weights_proj.weight"] = ("BF16", [32, h])
        t[f"{s}.indexer.k_norm.weight"] = ("BF16", [128])
        mlp = f"{p}.mlp"
        if i == 0:
            for proj, (n, k) in (("gate_proj", (dense, h)), ("up_proj", (dense, h)), ("down_proj", (h, dense))):
                add(t, f"{mlp}.{proj}", f(n, k))
        else:
            t[f"{mlp}.gate.weight"] = ("BF16", [256, h])
            t[f"{mlp}.gate.e_score_correction_bias"] = ("F32", [256])
            for proj, (n, k) in (("gate_proj", (moe, h)), ("up_proj", (moe, h)), ("down_proj", (h, moe))):
                add(t, f"{mlp}.experts.0.{proj}", f(n, k))
                add(t, f"{mlp}.shared_experts.{proj}", f(n, k))
        if i == 78:
            t[f"{p}.eh_proj.weight"] = ("BF16", [h, 2 * h])
            t[f"{p}.enorm.weight"] = ("BF16", [h])
        shards.append(t)
    config = tc.glm5_config(hidden=h, intermediate=dense, moe_intermediate=moe, n_routed_experts=256,
                            num_layers=78, first_k_dense=3, num_heads=heads, q_lora_rank=q_lora,
                            kv_lora_rank=kv_lora, rope_dim=rope, nope_dim=nope, v_dim=v, vocab=154880,
                            index_heads=32, index_head_dim=128)
    return write_header_only(folder, shards, config)


def minimax_m2_real(folder: Path) -> Path:
    """MiniMax-M2.x-FP8: hidden 3072, 48 heads x 128 (8 KV heads), 256 experts w1/w3 [1536, 3072],
    w2 [3072, 1536] under block_sparse_moe. F32 scales."""
    h, heads, kv, hd, inter = 3072, 48, 8, 128, 1536
    t: dict = {}
    s = "model.layers.0.self_attn"
    add(t, f"{s}.q_proj", fp8b(heads * hd, h, "F32"))
    add(t, f"{s}.k_proj", fp8b(kv * hd, h, "F32"))
    add(t, f"{s}.v_proj", fp8b(kv * hd, h, "F32"))
    add(t, f"{s}.o_proj", fp8b(h, heads * hd, "F32"))
    t["model.layers.0.block_sparse_moe.gate.weight"] = ("BF16", [256, h])
    for w, (n, k) in (("w1", (inter, h)), ("w3", (inter, h)), ("w2", (h, inter))):
        add(t, f"model.layers.0.block_sparse_moe.experts.0.{w}", fp8b(n, k, "F32"))
    config = tc.minimax_m2_config(hidden=h, num_heads=heads, num_kv_heads=kv, head_dim=hd, intermediate=inter,
                                  n_experts=256, num_layers=62, vocab=200064)
    return write_header_only(folder, [t], config)


@pytest.fixture(scope="module")
def real_families(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("real-families")
    return {
        "Qwen3.6-35B-A3B": qwen3_5_real(base / "Qwen3.6-35B-A3B-FP8", hidden=2048, heads=16, kv_heads=2,
                                        key_heads=16, value_heads=32, moe=512, shared=512, experts=256),
        "Qwen3.5-397B-A17B": qwen3_5_real(base / "Qwen3.5-397B-A17B-FP8", hidden=4096, heads=32, kv_heads=2,
                                          key_heads=16, value_heads=64, moe=1024, shared=1024, experts=512),
        "Qwen3-Next-80B-A3B": qwen3_next_real(base / "Qwen3-Next-80B-A3B-Instruct-FP8"),
        "GLM-5.1": glm5_1_real(base / "GLM-5.1-FP8"),
        "MiniMax-M2": minimax_m2_real(base / "MiniMax-M2.5"),
    }


# Qwen3.6-35B-A3B (hidden 2048; 16 heads x 256, 2 KV heads; linear key_dim 16*128 = 2048,
# value_dim 32*128 = 4096; experts and shared expert 512):
#   q_proj rows 2*16*256 = 8192: /64 = 128                                  -> 128 everywhere
#   k/v rows 2*256 = 512 over min(TP, 2) ranks: 256                         -> 128
#   o_proj cols 4096, in_proj_z rows 4096, out_proj cols 4096: /32 = 128, /64 = 64
#   in_proj_qkv parts [2048, 2048, 4096], each split: /16 = 128, /32 = 64, /64 = 32
#   experts + shared expert 512: /4 = 128, /8 = 64, /16 = 32, /32 = 16, /64 = 8 (below 16) -> None
# So 128 to TP4, 64 at TP8, 32 at TP16, 16 at TP32, nothing at TP64. With EP the routed experts
# are whole but the shared expert (512) is still split: the same table.
QWEN3_6_35B_TP = {"1": 128, "2": 128, "4": 128, "8": 64, "16": 32, "32": 16, "64": None}

# Qwen3.5-397B-A17B (hidden 4096; 32 heads x 256, 2 KV heads; key_dim 2048, value_dim 64*128 = 8192;
# experts and shared expert 1024):
#   q_proj rows 16384, o_proj cols 8192, in_proj_z / out_proj 8192: >= 128 per rank up to TP64
#   in_proj_qkv parts [2048, 2048, 8192]: key parts /16 = 128, /32 = 64, /64 = 32
#   experts + shared 1024: /8 = 128, /16 = 64, /32 = 32, /64 = 16
# -> 128 to TP8, 64 at TP16, 32 at TP32, 16 at TP64; EP: the shared expert still splits, same.
QWEN3_5_397B_TP = {"1": 128, "2": 128, "4": 128, "8": 128, "16": 64, "32": 32, "64": 16}

# Qwen3-Next-80B-A3B: in_proj_qkvz parts [2048, 2048, 4096, 4096]; experts and shared 512;
# attention as Qwen3.6-35B -> the same table as Qwen3.6-35B-A3B (128 to TP4, 64 at TP8).
QWEN3_NEXT_80B_TP = QWEN3_6_35B_TP

# GLM-5.1 (replicated: q_a_proj, kv_a_proj_with_mqa, indexer wq_b/wk, eh_proj):
#   q_b_proj rows 64*(192+64) = 16384: /64 = 256                            -> 128
#   kv_b_proj rows 64*(192+256) = 28672: /32 = 896 = 7*128, /64 = 448 = 7*64 -> 64 at TP64
#   o_proj cols 64*256 = 16384                                              -> 128
#   dense 12288: /16 = 768, /32 = 384 = 3*128, /64 = 192 = 3*64             -> 64 at TP64
#   experts + shared 2048: /16 = 128, /32 = 64, /64 = 32                     -> 128, 64, 32
# -> 128 to TP16, 64 at TP32, 32 at TP64; EP: dense and shared still split, same.
GLM_5_1_TP = {"1": 128, "2": 128, "4": 128, "8": 128, "16": 128, "32": 64, "64": 32}

# MiniMax-M2 (48 heads x 128, 8 KV heads, experts 1536):
#   q_proj rows / o_proj cols 6144: /16 = 384, /32 = 192 = 3*64, /64 = 96 = 3*32
#   k/v 1024 over min(TP, 8) ranks: 128
#   experts 1536: /4 = 384, /8 = 192 -> 64, /16 = 96 -> 32, /32 = 48 -> 16, /64 = 24 -> None
# With EP only attention splits: 128 to TP16, 64 at TP32, 32 at TP64.
MINIMAX_M2_TP = {"1": 128, "2": 128, "4": 128, "8": 64, "16": 32, "32": 16, "64": None}
MINIMAX_M2_TP_EP = {"1": 128, "2": 128, "4": 128, "8": 128, "16": 128, "32": 64, "64": 32}


@pytest.mark.parametrize("model, tp, tp_ep", [
    ("Qwen3.6-35B-A3B", QWEN3_6_35B_TP, QWEN3_6_35B_TP),
    ("Qwen3.5-397B-A17B", QWEN3_5_397B_TP, QWEN3_5_397B_TP),
    ("Qwen3-Next-80B-A3B", QWEN3_NEXT_80B_TP, QWEN3_NEXT_80B_TP),
    ("GLM-5.1", GLM_5_1_TP, GLM_5_1_TP),
    ("MiniMax-M2", MINIMAX_M2_TP, MINIMAX_M2_TP_EP),
])
def test_family_tp_table_matches_hand_computed_at_real_sizes(real_families, model, tp, tp_ep):
    info = dry_run_json(real_families[model])
    assert info["tp_unknown_weights"] == []
    assert info["tp"] == tp
    assert info["tp_ep"] == tp_ep


def step3_5_moe_layer(folder: Path, *, shared: bool) -> Path:
    """Step-3.5-Flash's MoE layer only (SGLang step3p5.py): routed experts stored stacked as
    `moe.{gate,up,down}_proj` [288, 1280, 4096] / [288, 4096, 1280], and (if `shared`) the shared
    expert `share_expert.*` of 1280."""
    h, inter, experts = 4096, 1280, 288
    t: dict = {}
    m = "model.layers.3"
    add(t, f"{m}.moe.gate_proj", fp8([experts, inter, h], [experts, 10, 32], "BF16"))
    add(t, f"{m}.moe.up_proj", fp8([experts, inter, h], [experts, 10, 32], "BF16"))
    add(t, f"{m}.moe.down_proj", fp8([experts, h, inter], [experts, 32, 10], "BF16"))
    t[f"{m}.moe.gate.weight"] = ("BF16", [experts, h])
    if shared:
        for proj, (n, k) in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            add(t, f"{m}.share_expert.{proj}", fp8b(n, k))
    config = {"architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5", "hidden_size": h,
              "moe_intermediate_size": inter, "share_expert_dim": inter, "moe_num_experts": experts,
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}}
    return write_header_only(folder, [t], config)


# 1280: /2 = 640 -> 128, /4 = 320 -> 64, /8 = 160 -> 32, /16 = 80 -> 16, /32 = 40 -> none.
STEP3_5_TP = {"1": 128, "2": 128, "4": 64, "8": 32, "16": 16, "32": None, "64": None}


def test_step3_5_stacked_moe_experts_are_routed_experts_whole_under_ep(tmp_path):
    info = dry_run_json(step3_5_moe_layer(tmp_path / "Step-3.5-Flash-FP8", shared=False))
    assert info["tp_unknown_weights"] == []
    assert info["tp"] == STEP3_5_TP
    assert set(info["tp_ep"].values()) == {128}


def test_step3_5_shared_expert_still_splits_under_ep(tmp_path):
    info = dry_run_json(step3_5_moe_layer(tmp_path / "Step-3.5-Flash-FP8", shared=True))
    assert info["tp_unknown_weights"] == []
    assert info["tp"] == STEP3_5_TP and info["tp_ep"] == STEP3_5_TP


def test_family_header_only_checkpoints_are_sparse(real_families):
    for folder in real_families.values():
        for shard in folder.glob("*.safetensors"):
            st = shard.stat()
            assert st.st_size > 50_000_000, shard
            assert st.st_blocks * 512 < 1_000_000, shard


def test_dry_run_prints_the_qwen3_6_table_without_unknown_layers(real_families):
    result = cli(real_families["Qwen3.6-35B-A3B"], "--dry-run", check=True)
    lines = result.stdout.splitlines()
    assert "    TP   " + "".join(f"{e:>6}" for e in ("128", "128", "128", "64", "32", "16", "-")) in lines
    assert "unknown" not in result.stdout


def test_tp8_on_qwen3_6_asks_for_64_naming_a_512_wide_expert(real_families):
    # vLLM #52997: 512 / 8 = 64 rows of an expert (routed or shared) per rank.
    result = cli(real_families["Qwen3.6-35B-A3B"], "--tp", 8, "--dry-run", check=True)
    assert re.search(r"TP8 needs 64x64 blocks: model\.language_model\.layers\.\d+\.mlp\.(experts\.\d+|shared_expert)"
                     r"\.(gate|up|down)_proj\.weight: 64 (rows|columns) per rank are not a multiple of 128",
                     result.stdout), result.stdout


def test_merged_in_proj_qkv_is_split_per_part_not_as_a_whole(tmp_path):
    # Only Qwen3.6's linear attention: in_proj_qkv [2048 + 2048 + 4096, 2048], in_proj_z [4096, 2048],
    # out_proj [2048, 4096]. Split per part the key parts (2048) give 128/64/32 rows per rank at
    # TP16/32/64; split as one 8192-row weight it would be 512/256/128, all multiples of 128.
    # in_proj_z / out_proj 4096: 128 at TP32, 64 at TP64. So: 128 to TP16, 64 at TP32, 32 at TP64.
    t: dict = {}
    a = "model.language_model.layers.0.linear_attn"
    add(t, f"{a}.in_proj_qkv", fp8b(8192, 2048))
    add(t, f"{a}.in_proj_z", fp8b(4096, 2048))
    add(t, f"{a}.out_proj", fp8b(2048, 4096))
    config = tc.qwen3_5_moe_config(hidden=2048, linear_key_heads=16, linear_key_head_dim=128,
                                   linear_value_heads=32, linear_value_head_dim=128)
    info = dry_run_json(write_header_only(tmp_path / "qwen3.6-linear-attn", [t], config))
    expected = {"1": 128, "2": 128, "4": 128, "8": 128, "16": 128, "32": 64, "64": 32}
    assert info["tp"] == expected and info["tp_ep"] == expected
    assert info["tp_unknown_weights"] == []


def test_in_proj_qkv_without_linear_attention_dims_is_listed_as_unknown(tmp_path):
    # Without linear_num_key_heads & co. the parts cannot be known: the advisor must say so.
    t: dict = {}
    add(t, "model.language_model.layers.0.linear_attn.in_proj_qkv", fp8b(8192, 2048))
    config = tc.qwen3_5_moe_config(hidden=2048)
    for key in ("linear_num_key_heads", "linear_key_head_dim"):
        del config["text_config"][key]
    info = dry_run_json(write_header_only(tmp_path / "no-dims", [t], config))
    assert info["tp_unknown_weights"] == ["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"]


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints with data: converted, compared with torch dequantization of the input
# ---------------------------------------------------------------------------------------------

def quant_blocks(folder: Path) -> list[tuple[str, tuple[int, int]]]:
    """(where, block) of every quantization_config copy in config.json (fp8 weight_block_size or
    compressed-tensors block_structure of each group)."""
    cfg = json.loads((folder / "config.json").read_text())
    found = []
    for where, holder in (("top", cfg), ("text_config", cfg.get("text_config") or {})):
        qc = holder.get("quantization_config")
        if qc is None:
            continue
        if qc["quant_method"] == "fp8":
            found.append((where, tuple(qc["weight_block_size"])))
        else:
            for name, group in qc["config_groups"].items():
                found.append((f"{where}:{name}", tuple(group["weights"]["block_structure"])))
    return found


def dequantize(folder: Path) -> dict[str, torch.Tensor]:
    """Every FP8 weight of `folder` as float32, dequantized by torch with the block its config
    declares (all copies must agree) and its `_scale_inv` or `_scale` tensor."""
    blocks = {b for _, b in quant_blocks(folder)}
    assert len(blocks) == 1, blocks
    block = blocks.pop()
    tensors = load_all(folder)
    out = {}
    for name, t in tensors.items():
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors.get(name + "_scale_inv", tensors.get(name + "_scale"))
            out[name] = tc.dequantize_block_fp8(t, scale, block)
    return out


def assert_same_weights(src: Path, out: Path) -> None:
    a, b = dequantize(src), dequantize(out)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    before, after = load_all(src), load_all(out)
    assert before.keys() == after.keys()
    for name, t in before.items():                      # every non-scale tensor: same bytes
        if not name.endswith(("_scale_inv", "_scale")):
            assert after[name].dtype == t.dtype and torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), name


def assert_refused_in_one_line(src: Path, *needles: str) -> str:
    before = snapshot(src)
    result = cli(src)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resize-block-size: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""
    assert siblings(src) == {src.name}                  # nothing created next to it
    assert snapshot(src) == before                      # nothing changed in it
    return lines[0]


def qwen3_5(folder: Path, quant_at: str = "top") -> Path:
    return tc.write_checkpoint(folder, tc.qwen3_5_moe_tensors(), tc.qwen3_5_moe_config(quant_at=quant_at),
                               shards=3, extra_files={"preprocessor_config.json": b'{"patch_size": 4}\n',
                                                      "chat_template.jinja": b"{{ messages }}\n"})


@pytest.mark.parametrize("quant_at", ["top", "text", "both"])
def test_qwen3_5_converts_exactly_wherever_its_quantization_config_is(tmp_path, quant_at):
    src = qwen3_5(tmp_path / "Qwen3.6-tiny", quant_at)
    out = tmp_path / "out"
    result = cli(src, "-o", out, "--verify")
    assert result.returncode == 0, result.stderr
    assert f"verified {out}" in result.stdout
    expected_places = {"top": ["top"], "text": ["text_config"], "both": ["top", "text_config"]}[quant_at]
    assert quant_blocks(out) == [(p, (64, 64)) for p in expected_places]
    assert_same_weights(src, out)


@pytest.mark.parametrize("quant_at", ["top", "text", "both"])
def test_qwen3_5_config_keeps_every_character_but_the_block(tmp_path, quant_at):
    src = qwen3_5(tmp_path / "Qwen3.6-tiny", quant_at)
    out = tmp_path / "out"
    cli(src, "-o", out, "-q", check=True)
    text = (src / "config.json").read_text()
    expected, n = re.subn(r'("weight_block_size": \[\s*)128(,\s*)128', r"\g<1>64\g<2>64", text)
    assert n == (2 if quant_at == "both" else 1)
    assert (out / "config.json").read_text() == expected


def test_qwen3_5_in_place_rewrites_both_configs_and_restore_gives_back_every_byte(tmp_path):
    src = qwen3_5(tmp_path / "Qwen3.6-tiny", "both")
    reference = qwen3_5(tmp_path / "reference", "both")
    original = snapshot(src)
    cli(src, "--in-place", "-q", check=True)
    assert quant_blocks(src) == [("top", (64, 64)), ("text_config", (64, 64))]
    assert_same_weights(reference, src)
    cli(src, "--restore", "-q", check=True)
    assert snapshot(src) == original


def test_quantization_config_only_under_text_config_is_not_called_unquantized(tmp_path):
    src = qwen3_5(tmp_path / "Qwen3.6-tiny", "text")
    info = dry_run_json(src)
    assert info["source_block"] == [128, 128] and info["scales"] > 0


def test_verify_fails_naming_a_nested_quantization_config_left_at_the_old_block(tmp_path):
    src = qwen3_5(tmp_path / "Qwen3.6-tiny", "both")
    out = tmp_path / "out"
    cli(src, "-o", out, "-q", check=True)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["quantization_config"]["weight_block_size"] = [128, 128]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    result = cli(src, "-o", out, "--verify")
    assert result.returncode == 1
    assert "text_config.quantization_config says fp8 128x128" in result.stderr, result.stderr
    assert "verified" not in result.stdout


def test_quantization_config_two_levels_down_is_found_and_rewritten(tmp_path):
    # Qwen3-Omni style: thinker_config.text_config.quantization_config, and a null one at the top.
    config = tc.qwen3_5_moe_config(quant_at="text")
    config["thinker_config"] = {"text_config": config.pop("text_config")}
    config["quantization_config"] = None
    src = tc.write_checkpoint(tmp_path / "Omni-like", tc.qwen3_5_moe_tensors(), config, shards=2)
    out = tmp_path / "out"
    result = cli(src, "-o", out, "--verify")
    assert result.returncode == 0, result.stderr
    after = json.loads((out / "config.json").read_text())
    assert after["thinker_config"]["text_config"]["quantization_config"]["weight_block_size"] == [64, 64]
    assert after["quantization_config"] is None


@pytest.mark.parametrize("args", [("",), ("", "--in-place"), ("", "--restore"), (" ", "--dry-run")],
                         ids=["convert", "in-place", "restore", "blank-dry-run"])
def test_empty_input_is_refused_not_taken_as_the_current_folder(tmp_path, monkeypatch, args):
    src = qwen3_5(tmp_path / "Qwen3.6-tiny")
    monkeypatch.chdir(src)                          # "$UNSET" would otherwise mean this folder
    before = snapshot(src)
    result = cli(*args)
    assert result.returncode == 2                  # a usage error, like any malformed command line
    assert result.stderr.strip() == "resize-block-size: error: INPUT is empty; give the model folder " \
                                    "(is the variable holding it unset?)"
    assert snapshot(src) == before and siblings(src) == {src.name}


def test_disagreeing_quantization_configs_are_refused_naming_both(tmp_path):
    config = tc.qwen3_5_moe_config(quant_at="both")
    config["text_config"]["quantization_config"]["weight_block_size"] = [64, 64]
    src = tc.write_checkpoint(tmp_path / "Qwen3.6-mixed", tc.qwen3_5_moe_tensors(), config, shards=2)
    assert_refused_in_one_line(src, "config.json", "disagree", "text_config.quantization_config says fp8 64x64",
                               "quantization_config says fp8 128x128")


def test_qwen3_5_vision_tower_fp8_layers_resized_bf16_layers_untouched(tmp_path):
    src = qwen3_5(tmp_path / "Qwen3.6-tiny")
    out = tmp_path / "out"
    cli(src, "-o", out, "-q", check=True)
    before, after = load_all(src), load_all(out)
    # block 0 attention is FP8: qkv [192, 64] -> scale [2, 1] at 128, [3, 1] at 64
    assert list(before["model.visual.blocks.0.attn.qkv.weight_scale_inv"].shape) == [2, 1]
    assert list(after["model.visual.blocks.0.attn.qkv.weight_scale_inv"].shape) == [3, 1]
    assert after["model.visual.blocks.0.attn.qkv.weight_scale_inv"].dtype == torch.bfloat16
    for name in ("model.visual.blocks.1.attn.qkv.weight", "model.visual.blocks.0.mlp.linear_fc1.weight",
                 "model.visual.merger.linear_fc1.weight"):
        assert after[name].dtype == torch.bfloat16 and torch.equal(after[name], before[name])
        assert name + "_scale_inv" not in after


def test_qwen3_5_scale_shapes_are_trimmed_per_tensor(tmp_path):
    src = qwen3_5(tmp_path / "Qwen3.6-tiny")
    out = tmp_path / "out"
    cli(src, "-o", out, "-q", check=True)
    t = load_all(out)
    p = "model.language_model.layers.0"
    # in_proj_qkv [2*128 + 256, 128] = [512, 128] -> [8, 2]; shared expert gate_proj [192, 128] -> [3, 2];
    # full-attention q_proj (layer 3) [2*2*64, 128] = [256, 128] -> [4, 2]; MTP q_proj the same.
    assert list(t[f"{p}.linear_attn.in_proj_qkv.weight_scale_inv"].shape) == [8, 2]
    assert list(t[f"{p}.mlp.shared_expert.gate_proj.weight_scale_inv"].shape) == [3, 2]
    assert list(t["model.language_model.layers.3.self_attn.q_proj.weight_scale_inv"].shape) == [4, 2]
    assert list(t["mtp.layers.0.self_attn.q_proj.weight_scale_inv"].shape) == [4, 2]


@pytest.mark.parametrize("family", ["qwen3_5", "glm5"])
def test_tiny_family_has_no_unknown_tp_layers(tmp_path, family):
    if family == "qwen3_5":
        src = qwen3_5(tmp_path / "Qwen3.6-tiny")
    else:
        src = tc.write_checkpoint(tmp_path / "GLM-5-tiny", tc.glm5_tensors(), tc.glm5_config())
    assert dry_run_json(src)["tp_unknown_weights"] == []


def test_glm5_converts_exactly_with_its_indexer(tmp_path):
    src = tc.write_checkpoint(tmp_path / "GLM-5-tiny", tc.glm5_tensors(), tc.glm5_config(), shards=4)
    out = tmp_path / "out"
    result = cli(src, "-o", out, "--verify")
    assert result.returncode == 0, result.stderr
    assert_same_weights(src, out)
    t = load_all(out)
    for i in range(3):            # layers 0, 1 and the MTP layer 2
        p = f"model.layers.{i}.self_attn.indexer"
        assert list(t[f"{p}.wq_b.weight_scale_inv"].shape) == [4, 1]     # [256, 64] at 64x64
        assert list(t[f"{p}.wk.weight_scale_inv"].shape) == [1, 2]       # [64, 128]
        assert t[f"{p}.weights_proj.weight"].dtype == torch.bfloat16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "glm_moe_dsa"
    assert cfg["quantization_config"]["modules_to_not_convert"] == \
        json.loads((src / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]


# ---------------------------------------------------------------------------------------------
# compressed-tensors FP8_BLOCK
# ---------------------------------------------------------------------------------------------

def compressed(folder: Path, scale_dtype: torch.dtype = torch.bfloat16, **dims) -> Path:
    tensors, config = tc.to_compressed_tensors(tc.qwen3_moe_tensors(scale_dtype=scale_dtype, **dims),
                                               tc.qwen3_moe_config(**dims))
    return tc.write_checkpoint(folder, tensors, config, shards=3)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=["BF16", "F32"])
def test_compressed_tensors_fp8_block_converts_bit_exactly(tmp_path, scale_dtype):
    src = compressed(tmp_path / "Qwen3-30B-A3B-FP8-BLOCK", scale_dtype, hidden=192, moe_intermediate=320)
    out = tmp_path / "out"
    result = cli(src, "-o", out, "--verify")
    assert result.returncode == 0, result.stderr
    assert f"verified {out}" in result.stdout
    assert quant_blocks(out) == [("top:group_0", (64, 64))]
    assert_same_weights(src, out)
    t = load_all(out)
    scales = {n: s for n, s in t.items() if n.endswith(".weight_scale")}
    assert scales and not any(n.endswith("_scale_inv") for n in t)
    assert all(s.dtype == scale_dtype for s in scales.values())
    # experts gate_proj [320, 192]: [3, 2] at 128 -> [5, 3] at 64
    assert list(t["model.layers.0.mlp.experts.0.gate_proj.weight_scale"].shape) == [5, 3]


def test_compressed_tensors_config_changes_only_block_structure_and_group_size(tmp_path):
    src = compressed(tmp_path / "Qwen3-FP8-BLOCK")
    out = tmp_path / "out"
    cli(src, "-o", out, "-q", check=True)
    before_text, after_text = (src / "config.json").read_text(), (out / "config.json").read_text()
    expected = json.loads(before_text)
    group = expected["quantization_config"]["config_groups"]["group_0"]
    group["weights"]["block_structure"] = [64, 64]
    group["input_activations"]["group_size"] = 64
    assert json.loads(after_text) == expected
    assert list(json.loads(after_text)["quantization_config"]) == list(expected["quantization_config"])
    changed = [(a, b) for a, b in zip(before_text.splitlines(), after_text.splitlines()) if a != b]
    assert len(before_text.splitlines()) == len(after_text.splitlines())
    assert sorted(b.strip() for _, b in changed) == ['"group_size": 64,', "64", "64,"]


def test_compressed_tensors_dry_run_counts_weight_scale_tensors(tmp_path):
    src = compressed(tmp_path / "Qwen3-FP8-BLOCK")
    info = dry_run_json(src)
    n_scales = sum(1 for n in load_all(src) if n.endswith(".weight_scale"))
    assert info["scales"] == n_scales > 0
    assert info["tp_unknown_weights"] == []
    assert all(ex["tensor"].endswith(".weight_scale") for ex in info["scale_examples"])
    assert siblings(src) == {src.name}


def test_compressed_tensors_in_place_then_restore_gives_back_every_byte(tmp_path):
    src = compressed(tmp_path / "Qwen3-FP8-BLOCK")
    reference = compressed(tmp_path / "reference")
    original = snapshot(src)
    cli(src, "--in-place", "-q", check=True)
    assert quant_blocks(src) == [("top:group_0", (64, 64))]
    assert_same_weights(reference, src)
    cli(src, "--restore", "-q", check=True)
    assert snapshot(src) == original


def test_compressed_tensors_tp_picks_the_block_and_rewrites_group_size_to_match(tmp_path):
    # Tiny Qwen3-MoE: q_proj rows 3 heads x 64 = 192, experts 64 rows. TP2: 96 and 32 rows per
    # rank, so 32x32 blocks; the activation group must follow (32).
    src = compressed(tmp_path / "Qwen3-FP8-BLOCK")
    result = cli(src, "--tp", 2, "-q")
    assert result.returncode == 0, result.stderr
    out = src.with_name(f"{src.name}-Block32x32")
    assert quant_blocks(out) == [("top:group_0", (32, 32))]
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"]["group_size"] == 32
    assert_same_weights(src, out)


@pytest.mark.parametrize("scheme", ["channel", "tensor", "int4-group"])
def test_other_compressed_tensors_schemes_are_refused_in_one_line(tmp_path, scheme):
    tensors, config = tc.to_compressed_tensors(tc.qwen3_dense_tensors(), tc.qwen3_dense_config())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    if scheme == "int4-group":
        weights.update(type="int", num_bits=4, strategy="group", group_size=128, block_structure=None)
        config["quantization_config"]["format"] = "pack-quantized"
    else:
        weights.update(strategy=scheme, block_structure=None)
    src = tc.write_checkpoint(tmp_path / f"Qwen3-{scheme}", tensors, config, shards=2)
    assert_refused_in_one_line(src, "config.json", "group_0", "FP8_BLOCK", "not converted")


# ---------------------------------------------------------------------------------------------
# Refused: DeepSeek-V4 / V4.1, and block-FP8 mixed with another quantization
# ---------------------------------------------------------------------------------------------

def test_deepseek_v4_is_refused_in_one_line_saying_why_and_what_works(tmp_path):
    src = tc.write_checkpoint(tmp_path / "DeepSeek-V4-Flash", tc.deepseek_v4_tensors(), tc.deepseek_v4_config(),
                              shards=2)
    line = assert_refused_in_one_line(src, "DeepSeek-V4", "deepseek_v4", "wo_a", "128x128", "expert parallelism",
                                      "TP at 8")
    assert "incomplete" not in line and "weight_scale_inv" not in line


def test_deepseek_v4_tensors_under_a_v3_config_are_refused_naming_them(tmp_path):
    # The same tensors with a config that does not say V4 (renamed or hand-edited): the tensors
    # themselves (`.scale` E8M0 next to FP8 weights, MXFP4 experts packed as I8) give it away.
    config = tc.deepseek_v3_config()
    src = tc.write_checkpoint(tmp_path / "V4-as-V3", tc.deepseek_v4_tensors(), config, shards=2)
    line = assert_refused_in_one_line(src, "another quantization", "Not converted")
    assert re.search(r"layers\.0\.\S+\.scale, layers\.0\.\S+, layers\.0\.\S+ and \d+ more \(", line), line


def test_deepseek_v41_is_refused(tmp_path):
    src = tc.write_checkpoint(tmp_path / "DeepSeek-V4.1-Flash", tc.deepseek_v4_tensors(),
                              tc.deepseek_v4_config(model_type="deepseek_v41"), shards=2)
    assert_refused_in_one_line(src, "DeepSeek-V4", "deepseek_v41")


def test_block_fp8_with_nvfp4_experts_is_refused_naming_the_tensors(tmp_path):
    # A Qwen3-MoE whose attention is block-FP8 but whose experts are NVFP4 (packed U8 weight,
    # F8_E4M3 group scales, F32 weight_scale_2 and input_scale): never half-convert it.
    tensors = tc.qwen3_moe_tensors()
    mixed = {}
    for name, t in tensors.items():
        if ".experts." in name and name.endswith(".weight_scale_inv"):
            continue
        if ".experts." in name and name.endswith(".weight"):
            n, k = t.shape
            mixed[name] = torch.zeros(n, k // 2, dtype=torch.uint8)
            mixed[name + "_scale"] = torch.ones(n, k // 16).to(torch.float8_e4m3fn)
            mixed[name + "_scale_2"] = torch.ones(())
            mixed[name[: -len("weight")] + "input_scale"] = torch.ones(())
        else:
            mixed[name] = t
    src = tc.write_checkpoint(tmp_path / "Qwen3-mixed-NVFP4", mixed, tc.qwen3_moe_config(), shards=2)
    assert_refused_in_one_line(src, "model.layers.0.mlp.experts.0.", "another quantization", "Not converted")
