"""Tiny but realistic block-FP8 checkpoints for tests and examples.

Builds DeepSeek-V3 (and V3.1 / Kimi-K2), Qwen3-FP8 (MoE and dense), MiniMax-M2, Qwen3.5/3.6
(multimodal, hybrid attention), GLM-5 (DSA indexer), compressed-tensors FP8_BLOCK and (to be
refused) DeepSeek-V4 style checkpoints: real tensor names, real dtypes (FP8 e4m3 weights + ``weight_scale_inv`` in
F32/BF16/F16, BF16 embeddings/norms/routers, F32 ``e_score_correction_bias``) and real
config.json shapes, at a few hundred KB. Every FP8 weight is a genuine block quantization of a
seeded random BF16 weight, so ``dequantize_block_fp8`` recovers it to FP8 accuracy.

Typical use::

    tensors = deepseek_v3_tensors(hidden=320, intermediate=576)
    write_checkpoint(tmp / "ckpt", tensors, deepseek_v3_config(hidden=320, intermediate=576),
                     extra_files=default_extra_files())
"""

from __future__ import annotations

import base64
import inspect
import json
import math
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "PT_METADATA",
    "quantize_block_fp8", "dequantize_block_fp8",
    "deepseek_v3_tensors", "deepseek_v3_config", "kimi_k2_tensors", "kimi_k2_config",
    "qwen3_moe_tensors", "qwen3_moe_config", "qwen3_dense_tensors", "qwen3_dense_config",
    "minimax_m2_tensors", "minimax_m2_config",
    "qwen3_5_moe_tensors", "qwen3_5_moe_config", "glm5_tensors", "glm5_config",
    "to_compressed_tensors", "deepseek_v4_tensors", "deepseek_v4_config",
    "write_checkpoint", "default_extra_files",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
PT_METADATA: Mapping[str, str] = MappingProxyType({"format": "pt"})
Block = tuple[int, int]

# Keyword arguments of the *_tensors builders that are not model dimensions.
_NON_DIMS = frozenset({"block", "scale_dtype", "seed", "fp8", "power_of_two_scales"})


# --------------------------------------------------------------------------------------------
# Block quantization


def _scale_grid(n: int, k: int, block: Block) -> tuple[int, int]:
    return math.ceil(n / block[0]), math.ceil(k / block[1])


def _expand(scale: torch.Tensor, block: Block, n: int, k: int) -> torch.Tensor:
    """Per-block scale -> per-element scale of shape [..., n, k] (repeat, then trim)."""
    full = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return full[..., :n, :k]


def quantize_block_fp8(
    w: torch.Tensor,
    block: Block,
    scale_dtype: torch.dtype = torch.float32,
    *,
    power_of_two_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize ``w`` ([N, K] or [E, N, K]) to FP8 e4m3 with one scale per block.

    Returns ``(q, scale)`` with scale shape ``[..., ceil(N/bn), ceil(K/bk)]`` in ``scale_dtype``;
    edge blocks may be partial. ``scale = amax / 448`` (rounded up to a power of two if
    ``power_of_two_scales``, as in ``scale_fmt: ue8m0`` checkpoints); the scale *as stored* is
    the multiplier used to compute ``q``, so ``dequantize_block_fp8(q, scale)`` is consistent.
    """
    if w.dim() < 2:
        raise ValueError(f"expected a 2-D or 3-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape[-2:]
    sn, sk = _scale_grid(n, k, block)
    w = w.float()
    padded = torch.nn.functional.pad(w.abs(), (0, sk * block[1] - k, 0, sn * block[0] - n))
    amax = padded.reshape(*w.shape[:-2], sn, block[0], sk, block[1]).amax(dim=(-3, -1))
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(scale_dtype).tiny)  # never a zero scale
    if power_of_two_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale = scale.to(scale_dtype)
    q = (w / _expand(scale.float(), block, n, k)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def dequantize_block_fp8(q: torch.Tensor, scale: torch.Tensor, block: Block) -> torch.Tensor:
    """Float32 ``q * scale`` with each scale covering a ``block`` tile (edge tiles partial).

    Raises ValueError if ``scale`` is not exactly ``[..., ceil(N/bn), ceil(K/bk)]``.
    """
    n, k = q.shape[-2:]
    expected = (*q.shape[:-2], *_scale_grid(n, k, block))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)} "
            f"with block {list(block)}: expected {expected}"
        )
    return q.float() * _expand(scale.float(), block, n, k)


# --------------------------------------------------------------------------------------------
# Shared tensor builder


class _Builder:
    """Collects tensors in insertion (= layer) order; every tensor is seeded by its own name,
    so changing one dimension never changes the values of unrelated tensors."""

    def __init__(self, *, block: Block, scale_dtype: torch.dtype, seed: int, fp8: bool,
                 power_of_two_scales: bool = False) -> None:
        self.block, self.scale_dtype, self.seed = tuple(block), scale_dtype, seed
        self.fp8, self.pow2 = fp8, power_of_two_scales
        self.tensors: dict[str, torch.Tensor] = {}

    def _gen(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))

    def bf16(self, name: str, *shape: int, std: float = 0.02) -> None:
        self.tensors[name] = (torch.randn(shape, generator=self._gen(name)) * std).bfloat16()

    def norm(self, name: str, dim: int) -> None:
        g = self._gen(name)
        self.tensors[name] = (1.0 + 0.1 * torch.randn(dim, generator=g)).bfloat16()

    def bias_f32(self, name: str, dim: int) -> None:
        self.tensors[name] = 0.01 * torch.randn(dim, generator=self._gen(name))

    def linear(self, prefix: str, n: int, k: int) -> None:
        """``prefix.weight`` [n, k]: FP8 + ``weight_scale_inv``, or plain BF16 if not fp8.

        Rows and columns get log-uniform gains (x0.35..x2.8) so per-block scales differ."""
        g = self._gen(prefix + ".weight")
        gain_n = torch.exp2(torch.rand(n, 1, generator=g) * 3 - 1.5)
        gain_k = torch.exp2(torch.rand(1, k, generator=g) * 3 - 1.5)
        w = (torch.randn(n, k, generator=g) * 0.02 * gain_n * gain_k).bfloat16()
        if not self.fp8:
            self.tensors[prefix + ".weight"] = w
            return
        q, s = quantize_block_fp8(w, self.block, self.scale_dtype, power_of_two_scales=self.pow2)
        self.tensors[prefix + ".weight"] = q
        self.tensors[prefix + ".weight_scale_inv"] = s

    def mlp(self, prefix: str, hidden: int, inter: int,
            names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
        """SwiGLU MLP: gate/up [inter, hidden], down [hidden, inter] (names in that order)."""
        gate, up, down = names
        self.linear(f"{prefix}.{gate}", inter, hidden)
        self.linear(f"{prefix}.{up}", inter, hidden)
        self.linear(f"{prefix}.{down}", hidden, inter)

    def router(self, prefix: str, n_experts: int, hidden: int, bias: str | None) -> None:
        """BF16 router ``prefix.gate.weight`` [E, hidden] (never quantized) + optional F32 bias."""
        self.bf16(f"{prefix}.gate.weight", n_experts, hidden)
        if bias is not None:
            self.bias_f32(f"{prefix}.{bias}", n_experts)

    def experts(self, prefix: str, n_experts: int, hidden: int, inter: int,
                names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> None:
        for e in range(n_experts):
            self.mlp(f"{prefix}.experts.{e}", hidden, inter, names)

    def gqa_attention(self, prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int,
                      per_layer_qk_norm: bool) -> None:
        """q/k/v/o projections + q_norm/k_norm (per head [head_dim] or per layer [heads*dim])."""
        self.linear(f"{prefix}.q_proj", heads * head_dim, hidden)
        self.linear(f"{prefix}.k_proj", kv_heads * head_dim, hidden)
        self.linear(f"{prefix}.v_proj", kv_heads * head_dim, hidden)
        self.linear(f"{prefix}.o_proj", hidden, heads * head_dim)
        self.norm(f"{prefix}.q_norm.weight", heads * head_dim if per_layer_qk_norm else head_dim)
        self.norm(f"{prefix}.k_norm.weight", kv_heads * head_dim if per_layer_qk_norm else head_dim)


def _decoder_layer(b: _Builder, i: int, hidden: int, attn: Callable[[str], None],
                   mlp: Callable[[str], None], mlp_name: str = "mlp") -> None:
    p = f"model.layers.{i}"
    b.norm(f"{p}.input_layernorm.weight", hidden)
    attn(f"{p}.self_attn")
    b.norm(f"{p}.post_attention_layernorm.weight", hidden)
    mlp(f"{p}.{mlp_name}")


def _embed(b: _Builder, vocab: int, hidden: int) -> None:
    b.bf16("model.embed_tokens.weight", vocab, hidden)


def _final(b: _Builder, vocab: int, hidden: int, tie_word_embeddings: bool = False) -> None:
    b.norm("model.norm.weight", hidden)
    if not tie_word_embeddings:
        b.bf16("lm_head.weight", vocab, hidden)


# --------------------------------------------------------------------------------------------
# DeepSeek-V3 / V3.1 / Kimi-K2


def deepseek_v3_tensors(
    *,
    hidden: int = 128,
    intermediate: int = 192,
    moe_intermediate: int = 64,
    n_routed_experts: int = 2,
    n_shared_experts: int = 1,
    num_layers: int = 2,
    first_k_dense: int = 1,
    mtp: bool = True,
    num_heads: int = 2,
    q_lora_rank: int = 64,
    kv_lora_rank: int = 128,
    rope_dim: int = 64,
    nope_dim: int = 32,
    v_dim: int = 32,
    vocab: int = 16,
    block: Block = (128, 128),
    scale_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    fp8: bool = True,
    power_of_two_scales: bool = False,
) -> dict[str, torch.Tensor]:
    """All tensors of a tiny DeepSeek-V3 (MLA attention, dense then MoE layers, optional MTP
    layer at index ``num_layers``), with the real names and dtypes.

    Defaults (~0.5 MB) scale the real layout down: like DeepSeek-V3 every dim is a multiple of
    64 (so a 64x64 result is valid for engines and transformers) but several are not multiples
    of 128 and need the replicated scale grid trimmed at 64: kv_a_proj_with_mqa rows 192
    (= kv_lora 128 + rope 64, like 576 = 512 + 64), intermediate 192 (rows of gate/up, columns
    of down), q_lora 64 and moe_intermediate 64 (= 2048 over TP 32). Pass e.g. ``hidden=130``
    or ``intermediate=100`` for dims that are not multiples of 64.
    ``fp8=False`` returns the unquantized BF16 originals under the same names (no scales).
    """
    b = _Builder(block=block, scale_dtype=scale_dtype, seed=seed, fp8=fp8,
                 power_of_two_scales=power_of_two_scales)

    def attn(p: str) -> None:
        b.linear(f"{p}.q_a_proj", q_lora_rank, hidden)
        b.norm(f"{p}.q_a_layernorm.weight", q_lora_rank)
        b.linear(f"{p}.q_b_proj", num_heads * (nope_dim + rope_dim), q_lora_rank)
        b.linear(f"{p}.kv_a_proj_with_mqa", kv_lora_rank + rope_dim, hidden)
        b.norm(f"{p}.kv_a_layernorm.weight", kv_lora_rank)
        b.linear(f"{p}.kv_b_proj", num_heads * (nope_dim + v_dim), kv_lora_rank)
        b.linear(f"{p}.o_proj", hidden, num_heads * v_dim)

    def dense(p: str) -> None:
        b.mlp(p, hidden, intermediate)

    def moe(p: str) -> None:
        b.router(p, n_routed_experts, hidden, bias="gate.e_score_correction_bias")
        b.experts(p, n_routed_experts, hidden, moe_intermediate)
        b.mlp(f"{p}.shared_experts", hidden, moe_intermediate * n_shared_experts)

    _embed(b, vocab, hidden)
    for i in range(num_layers):
        _decoder_layer(b, i, hidden, attn, dense if i < first_k_dense else moe)
    _final(b, vocab, hidden)
    if mtp:  # DeepSeek's multi-token-prediction layer: everything BF16 except attention/MoE
        p = f"model.layers.{num_layers}"
        b.bf16(f"{p}.embed_tokens.weight", vocab, hidden)
        b.norm(f"{p}.enorm.weight", hidden)
        b.norm(f"{p}.hnorm.weight", hidden)
        b.bf16(f"{p}.eh_proj.weight", hidden, 2 * hidden)
        _decoder_layer(b, num_layers, hidden, attn, moe)
        b.norm(f"{p}.shared_head.norm.weight", hidden)
        b.bf16(f"{p}.shared_head.head.weight", vocab, hidden)
    return b.tensors


def _dims(builder: Callable[..., Any], dims: Mapping[str, Any],
          defaults: Mapping[str, Any] = MappingProxyType({})) -> dict[str, Any]:
    """The builder's dimension defaults, overridden by ``defaults`` then ``dims``."""
    params = inspect.signature(builder).parameters
    known = {k: p.default for k, p in params.items() if k not in _NON_DIMS}
    unknown = set(dims) - set(known)
    if unknown:
        raise TypeError(f"unknown dimension(s) for {builder.__name__}: {sorted(unknown)}")
    return {**known, **defaults, **dims}


def _quant_config(block: Block, **extra: Any) -> dict[str, Any]:
    return {"activation_scheme": "dynamic", **extra, "quant_method": "fp8",
            "weight_block_size": list(block)}


def deepseek_v3_config(*, block: Block = (128, 128), scale_fmt: str | None = None,
                       **dims: Any) -> dict[str, Any]:
    """config.json of the checkpoint made by ``deepseek_v3_tensors(**dims)``.

    ``scale_fmt="ue8m0"`` gives the DeepSeek-V3.1 variant (pair it with
    ``deepseek_v3_tensors(power_of_two_scales=True)``).
    """
    d = _dims(deepseek_v3_tensors, dims)
    quant = _quant_config(block, fmt="e4m3")
    if scale_fmt is not None:
        quant["scale_fmt"] = scale_fmt
    n_experts = d["n_routed_experts"]
    n_group = 2 if n_experts % 4 == 0 else 1  # >= 2 experts per group
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": d["first_k_dense"],
        "hidden_act": "silu",
        "hidden_size": d["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": d["intermediate"],
        "kv_lora_rank": d["kv_lora_rank"],
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": d["moe_intermediate"],
        "moe_layer_freq": 1,
        "n_group": n_group,
        "n_routed_experts": n_experts,
        "n_shared_experts": d["n_shared_experts"],
        "norm_topk_prob": True,
        "num_attention_heads": d["num_heads"],
        "num_experts_per_tok": min(8, max(1, n_experts // 2)),
        "num_hidden_layers": d["num_layers"],
        "num_key_value_heads": d["num_heads"],
        "num_nextn_predict_layers": int(d["mtp"]),
        "q_lora_rank": d["q_lora_rank"],
        "qk_nope_head_dim": d["nope_dim"],
        "qk_rope_head_dim": d["rope_dim"],
        "quantization_config": quant,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "v_head_dim": d["v_dim"],
        "vocab_size": d["vocab"],
    }


_KIMI_K2 = MappingProxyType({"mtp": False, "first_k_dense": 1})


def kimi_k2_tensors(**kwargs: Any) -> dict[str, torch.Tensor]:
    """Kimi-K2 = DeepSeek-V3 layout without MTP, one dense layer (same keywords)."""
    return deepseek_v3_tensors(**{**_KIMI_K2, **kwargs})


def kimi_k2_config(*, block: Block = (128, 128), **dims: Any) -> dict[str, Any]:
    """config.json of ``kimi_k2_tensors(**dims)``: DeepseekV3ForCausalLM, model_type kimi_k2."""
    cfg = deepseek_v3_config(block=block, **{**_KIMI_K2, **dims})
    cfg.update(model_type="kimi_k2", n_group=1, topk_group=1, routed_scaling_factor=2.827,
               max_position_embeddings=131072, rms_norm_eps=1e-05, rope_theta=50000.0)
    cfg["rope_scaling"].update(factor=32.0, original_max_position_embeddings=4096)
    return cfg


# --------------------------------------------------------------------------------------------
# Qwen3-FP8 (MoE and dense) and MiniMax-M2


def _gqa_model(b: _Builder, *, hidden: int, num_layers: int, num_heads: int, num_kv_heads: int,
               head_dim: int, vocab: int, per_layer_qk_norm: bool, mlp: Callable[[str], None],
               mlp_name: str = "mlp", tie_word_embeddings: bool = False) -> dict[str, torch.Tensor]:
    def attn(p: str) -> None:
        b.gqa_attention(p, hidden, num_heads, num_kv_heads, head_dim, per_layer_qk_norm)

    _embed(b, vocab, hidden)
    for i in range(num_layers):
        _decoder_layer(b, i, hidden, attn, mlp, mlp_name)
    _final(b, vocab, hidden, tie_word_embeddings)
    return b.tensors


def qwen3_moe_tensors(
    *,
    hidden: int = 128,
    moe_intermediate: int = 64,
    n_experts: int = 4,
    num_layers: int = 2,
    num_heads: int = 3,
    num_kv_heads: int = 1,
    head_dim: int = 64,
    vocab: int = 16,
    block: Block = (128, 128),
    scale_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    fp8: bool = True,
    power_of_two_scales: bool = False,
) -> dict[str, torch.Tensor]:
    """Tiny Qwen3-MoE-FP8 (e.g. Qwen3-30B-A3B-FP8): FP8 attention and experts with **BF16**
    scales, BF16 router ``mlp.gate.weight``, per-head q_norm/k_norm, no shared expert.
    q_proj rows / o_proj columns 192 (3 heads x 64) need a trim at 64."""
    b = _Builder(block=block, scale_dtype=scale_dtype, seed=seed, fp8=fp8,
                 power_of_two_scales=power_of_two_scales)

    def moe(p: str) -> None:
        b.router(p, n_experts, hidden, bias=None)
        b.experts(p, n_experts, hidden, moe_intermediate)

    return _gqa_model(b, hidden=hidden, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, vocab=vocab,
                      per_layer_qk_norm=False, mlp=moe)


def qwen3_dense_tensors(
    *,
    hidden: int = 128,
    intermediate: int = 192,
    num_layers: int = 2,
    num_heads: int = 3,
    num_kv_heads: int = 1,
    head_dim: int = 64,
    vocab: int = 16,
    tie_word_embeddings: bool = False,
    block: Block = (128, 128),
    scale_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    fp8: bool = True,
    power_of_two_scales: bool = False,
) -> dict[str, torch.Tensor]:
    """Tiny dense Qwen3-FP8 (e.g. Qwen3-8B-FP8): BF16 scales by default; pass
    ``scale_dtype=torch.float16`` for the F16-scale variant (Qwen3-4B-Instruct-2507-FP8)."""
    b = _Builder(block=block, scale_dtype=scale_dtype, seed=seed, fp8=fp8,
                 power_of_two_scales=power_of_two_scales)
    return _gqa_model(b, hidden=hidden, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, vocab=vocab,
                      per_layer_qk_norm=False, tie_word_embeddings=tie_word_embeddings,
                      mlp=lambda p: b.mlp(p, hidden, intermediate))


def minimax_m2_tensors(
    *,
    hidden: int = 128,
    intermediate: int = 64,
    n_experts: int = 4,
    num_layers: int = 2,
    num_heads: int = 3,
    num_kv_heads: int = 1,
    head_dim: int = 64,
    vocab: int = 16,
    block: Block = (128, 128),
    scale_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    fp8: bool = True,
    power_of_two_scales: bool = False,
) -> dict[str, torch.Tensor]:
    """Tiny MiniMax-M2: ``block_sparse_moe.experts.{e}.w1/w3`` [I, H], ``w2`` [H, I] FP8,
    BF16 ``block_sparse_moe.gate.weight``, F32 ``block_sparse_moe.e_score_correction_bias``,
    per-layer q_norm/k_norm ([heads*head_dim])."""
    b = _Builder(block=block, scale_dtype=scale_dtype, seed=seed, fp8=fp8,
                 power_of_two_scales=power_of_two_scales)

    def moe(p: str) -> None:
        b.router(p, n_experts, hidden, bias="e_score_correction_bias")
        b.experts(p, n_experts, hidden, intermediate, names=("w1", "w3", "w2"))

    return _gqa_model(b, hidden=hidden, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, vocab=vocab,
                      per_layer_qk_norm=True, mlp=moe, mlp_name="block_sparse_moe")


def _gqa_config(d: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """Fields shared by the Qwen3 / MiniMax configs, then ``fields``; keys sorted like HF."""
    cfg = {
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "head_dim": d["head_dim"],
        "hidden_act": "silu",
        "hidden_size": d["hidden"],
        "initializer_range": 0.02,
        "max_position_embeddings": 40960,
        "num_attention_heads": d["num_heads"],
        "num_hidden_layers": d["num_layers"],
        "num_key_value_heads": d["num_kv_heads"],
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": d.get("tie_word_embeddings", False),
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": d["vocab"],
        **fields,
    }
    return dict(sorted(cfg.items()))


def _qwen3_not_converted(num_layers: int, per_layer: tuple[str, ...]) -> list[str]:
    names = [f"model.layers.{i}.{m}" for i in range(num_layers) for m in per_layer]
    return ["lm_head", *names, "model.norm"]


_QWEN3_COMMON = MappingProxyType({
    "attention_bias": False, "max_window_layers": 28, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "transformers_version": "4.51.0",
    "use_sliding_window": False,
})


def qwen3_moe_config(*, block: Block = (128, 128), **dims: Any) -> dict[str, Any]:
    """config.json of ``qwen3_moe_tensors(**dims)``: quantization_config without ``fmt`` and
    with ``modules_to_not_convert`` (lm_head, norms, routers)."""
    d = _dims(qwen3_moe_tensors, dims)
    skip = ("input_layernorm", "mlp.gate", "post_attention_layernorm")
    return _gqa_config(
        d, **_QWEN3_COMMON,
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
        decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=4 * d["hidden"],
        moe_intermediate_size=d["moe_intermediate"], num_experts=d["n_experts"],
        num_experts_per_tok=min(2, d["n_experts"]), norm_topk_prob=True,
        output_router_logits=False, router_aux_loss_coef=0.001,
        quantization_config=_quant_config(
            block, modules_to_not_convert=_qwen3_not_converted(d["num_layers"], skip)),
    )


def qwen3_dense_config(*, block: Block = (128, 128), **dims: Any) -> dict[str, Any]:
    """config.json of ``qwen3_dense_tensors(**dims)`` (Qwen3ForCausalLM)."""
    d = _dims(qwen3_dense_tensors, dims)
    skip = ("input_layernorm", "post_attention_layernorm")
    return _gqa_config(
        d, **_QWEN3_COMMON,
        architectures=["Qwen3ForCausalLM"], model_type="qwen3",
        intermediate_size=d["intermediate"],
        quantization_config=_quant_config(
            block, modules_to_not_convert=_qwen3_not_converted(d["num_layers"], skip)),
    )


def minimax_m2_config(*, block: Block = (128, 128), **dims: Any) -> dict[str, Any]:
    """config.json of ``minimax_m2_tensors(**dims)``: ``fmt: "float8_e4m3fn"``."""
    d = _dims(minimax_m2_tensors, dims)
    return _gqa_config(
        d,
        architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2",
        auto_map={"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                  "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
        intermediate_size=d["intermediate"], num_local_experts=d["n_experts"],
        num_experts_per_tok=min(2, d["n_experts"]), partial_rotary_factor=0.5,
        rotary_dim=d["head_dim"] // 2, rope_theta=5000000, qk_norm_type="per_layer",
        use_qk_norm=True, scoring_func="sigmoid", use_routing_bias=True,
        shared_intermediate_size=0, router_aux_loss_coef=0.001, transformers_version="4.46.1",
        quantization_config=_quant_config(
            block, fmt="float8_e4m3fn",
            modules_to_not_convert=["gate", "e_score_correction_bias", "lm_head"]),
    )


# --------------------------------------------------------------------------------------------
# 2026 families: Qwen3.5/3.6 (hybrid attention, multimodal), GLM-5 (DSA indexer),
# compressed-tensors FP8_BLOCK, and DeepSeek-V4 (which the converter refuses)


def qwen3_5_moe_tensors(
    *,
    hidden: int = 128,
    num_layers: int = 4,
    full_attention_interval: int = 4,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 64,
    linear_key_heads: int = 2,
    linear_key_head_dim: int = 64,
    linear_value_heads: int = 4,
    linear_value_head_dim: int = 64,
    conv_kernel: int = 4,
    n_experts: int = 4,
    moe_intermediate: int = 64,
    shared_intermediate: int = 192,
    mtp: bool = True,
    vision_hidden: int = 64,
    vision_intermediate: int = 192,
    vision_depth: int = 2,
    vocab: int = 16,
    block: Block = (128, 128),
    scale_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    fp8: bool = True,
    power_of_two_scales: bool = False,
) -> dict[str, torch.Tensor]:
    """Tiny Qwen3.5/3.6-MoE-FP8 (``Qwen3_5MoeForConditionalGeneration``): text layers under
    ``model.language_model.layers.N``, gated-delta-net linear attention in three of every four
    layers (FP8 ``linear_attn.in_proj_qkv`` [2*key_dim + value_dim, H], ``in_proj_z``,
    ``out_proj``; BF16 ``in_proj_a/b``, ``conv1d``, ``A_log``, ``dt_bias``, ``norm``), full
    attention with the output gate (``q_proj`` 2x wide) in the others, routed experts plus the
    singular ``mlp.shared_expert`` and BF16 ``mlp.shared_expert_gate``, one ``mtp.layers.0``
    layer with BF16 ``mtp.fc``, and a vision tower whose first block's attention is FP8 and
    the rest BF16 (as listed in ``modules_to_not_convert``). BF16 scales.
    """
    b = _Builder(block=block, scale_dtype=scale_dtype, seed=seed, fp8=fp8,
                 power_of_two_scales=power_of_two_scales)
    key_dim = linear_key_heads * linear_key_head_dim
    value_dim = linear_value_heads * linear_value_head_dim

    def full_attn(p: str) -> None:
        b.linear(f"{p}.q_proj", 2 * num_heads * head_dim, hidden)   # query and output gate
        b.linear(f"{p}.k_proj", num_kv_heads * head_dim, hidden)
        b.linear(f"{p}.v_proj", num_kv_heads * head_dim, hidden)
        b.linear(f"{p}.o_proj", hidden, num_heads * head_dim)
        b.norm(f"{p}.q_norm.weight", head_dim)
        b.norm(f"{p}.k_norm.weight", head_dim)

    def linear_attn(p: str) -> None:
        b.linear(f"{p}.in_proj_qkv", 2 * key_dim + value_dim, hidden)
        b.linear(f"{p}.in_proj_z", value_dim, hidden)
        b.bf16(f"{p}.in_proj_b.weight", linear_value_heads, hidden)
        b.bf16(f"{p}.in_proj_a.weight", linear_value_heads, hidden)
        b.bf16(f"{p}.conv1d.weight", 2 * key_dim + value_dim, 1, conv_kernel)
        b.bias_f32(f"{p}.A_log", linear_value_heads)
        b.bf16(f"{p}.dt_bias", linear_value_heads, std=1.0)
        b.norm(f"{p}.norm.weight", linear_value_head_dim)
        b.linear(f"{p}.out_proj", hidden, value_dim)

    def moe(p: str) -> None:
        b.router(p, n_experts, hidden, bias=None)
        b.experts(p, n_experts, hidden, moe_intermediate)
        b.mlp(f"{p}.shared_expert", hidden, shared_intermediate)
        b.bf16(f"{p}.shared_expert_gate.weight", 1, hidden)

    def layer(p: str, full: bool) -> None:
        b.norm(f"{p}.input_layernorm.weight", hidden)
        full_attn(f"{p}.self_attn") if full else linear_attn(f"{p}.linear_attn")
        b.norm(f"{p}.post_attention_layernorm.weight", hidden)
        moe(f"{p}.mlp")

    b.bf16("model.language_model.embed_tokens.weight", vocab, hidden)
    for i in range(num_layers):
        layer(f"model.language_model.layers.{i}", (i + 1) % full_attention_interval == 0)
    b.norm("model.language_model.norm.weight", hidden)
    b.bf16("lm_head.weight", vocab, hidden)
    if mtp:
        b.bf16("mtp.fc.weight", hidden, 2 * hidden)
        b.norm("mtp.pre_fc_norm_embedding.weight", hidden)
        b.norm("mtp.pre_fc_norm_hidden.weight", hidden)
        layer("mtp.layers.0", True)
        b.norm("mtp.norm.weight", hidden)
    v = "model.visual"
    b.bf16(f"{v}.patch_embed.proj.weight", vision_hidden, 3, 2, 4, 4)
    b.bf16(f"{v}.pos_embed.weight", 16, vision_hidden)
    for i in range(vision_depth):
        p = f"{v}.blocks.{i}"
        b.norm(f"{p}.norm1.weight", vision_hidden)
        b.norm(f"{p}.norm2.weight", vision_hidden)
        if i == 0:        # FP8 attention in the first block only
            b.linear(f"{p}.attn.qkv", 3 * vision_hidden, vision_hidden)
            b.linear(f"{p}.attn.proj", vision_hidden, vision_hidden)
        else:
            b.bf16(f"{p}.attn.qkv.weight", 3 * vision_hidden, vision_hidden)
            b.bf16(f"{p}.attn.proj.weight", vision_hidden, vision_hidden)
        b.bf16(f"{p}.mlp.linear_fc1.weight", vision_intermediate, vision_hidden)
        b.bf16(f"{p}.mlp.linear_fc2.weight", vision_hidden, vision_intermediate)
    b.norm(f"{v}.merger.norm.weight", vision_hidden)
    b.bf16(f"{v}.merger.linear_fc1.weight", 4 * vision_hidden, 4 * vision_hidden)
    b.bf16(f"{v}.merger.linear_fc2.weight", hidden, 4 * vision_hidden)
    return b.tensors


def qwen3_5_moe_config(*, block: Block = (128, 128), quant_at: str = "top", **dims: Any) -> dict[str, Any]:
    """config.json of ``qwen3_5_moe_tensors(**dims)``: text settings under ``text_config``,
    vision under ``vision_config``; ``quantization_config`` at the top level (``quant_at="top"``,
    as published), only under ``text_config`` (``"text"``) or in both places (``"both"``).
    ``modules_to_not_convert`` holds full per-layer paths with the wrapper prefix."""
    d = _dims(qwen3_5_moe_tensors, dims)
    n, interval = d["num_layers"], d["full_attention_interval"]
    layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    skip = ["lm_head", "model.language_model.embed_tokens", "mtp.fc"]
    for i, kind in enumerate(layer_types):
        p = f"model.language_model.layers.{i}"
        if kind == "linear_attention":
            skip += [f"{p}.linear_attn.in_proj_a", f"{p}.linear_attn.in_proj_b", f"{p}.linear_attn.conv1d"]
        skip += [f"{p}.mlp.gate", f"{p}.mlp.shared_expert_gate"]
    skip += ["model.visual.patch_embed.proj", "model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2"]
    for i in range(d["vision_depth"]):
        p = f"model.visual.blocks.{i}"
        skip += ([] if i == 0 else [f"{p}.attn.qkv", f"{p}.attn.proj"]) + [f"{p}.mlp.linear_fc1", f"{p}.mlp.linear_fc2"]
    quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "modules_to_not_convert": skip,
             "quant_method": "fp8", "weight_block_size": list(block)}
    text = {
        "attention_bias": False, "attn_output_gate": True, "bos_token_id": 0, "eos_token_id": 1,
        "full_attention_interval": interval, "head_dim": d["head_dim"], "hidden_act": "silu",
        "hidden_size": d["hidden"], "layer_types": layer_types,
        "linear_conv_kernel_dim": d["conv_kernel"], "linear_key_head_dim": d["linear_key_head_dim"],
        "linear_num_key_heads": d["linear_key_heads"], "linear_num_value_heads": d["linear_value_heads"],
        "linear_value_head_dim": d["linear_value_head_dim"], "max_position_embeddings": 262144,
        "model_type": "qwen3_5_moe_text", "moe_intermediate_size": d["moe_intermediate"],
        "mtp_num_hidden_layers": int(d["mtp"]), "num_attention_heads": d["num_heads"],
        "num_experts": d["n_experts"], "num_experts_per_tok": min(2, d["n_experts"]),
        "num_hidden_layers": n, "num_key_value_heads": d["num_kv_heads"], "rms_norm_eps": 1e-06,
        "shared_expert_intermediate_size": d["shared_intermediate"], "vocab_size": d["vocab"],
    }
    vision = {"depth": d["vision_depth"], "hidden_size": d["vision_hidden"], "in_channels": 3,
              "intermediate_size": d["vision_intermediate"], "model_type": "qwen3_5_moe", "num_heads": 1,
              "out_hidden_size": d["hidden"], "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    cfg: dict[str, Any] = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"], "image_token_id": 12,
        "model_type": "qwen3_5_moe", "text_config": text, "tie_word_embeddings": False,
        "transformers_version": "4.57.0.dev0", "video_token_id": 13, "vision_config": vision,
        "vision_end_token_id": 11, "vision_start_token_id": 10,
    }
    if quant_at in ("top", "both"):
        cfg["quantization_config"] = quant
    if quant_at in ("text", "both"):
        text["quantization_config"] = json.loads(json.dumps(quant))
    if quant_at not in ("top", "text", "both"):
        raise ValueError(f"quant_at must be top, text or both, not {quant_at!r}")
    return cfg


def glm5_tensors(*, index_heads: int = 4, index_head_dim: int = 64, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Tiny GLM-5 / GLM-5.1-FP8 (``GlmMoeDsaForCausalLM``): the DeepSeek-V3 layout (MLA, dense then
    MoE layers with ``mlp.shared_experts``, an MTP layer with ``eh_proj``) plus the DSA indexer in
    every attention block: FP8 ``indexer.wq_b`` [heads*dim, q_lora] and ``indexer.wk`` [dim, H],
    BF16 ``indexer.weights_proj`` and ``indexer.k_norm``. Same keywords as ``deepseek_v3_tensors``."""
    base = deepseek_v3_tensors(**kwargs)
    d = _dims(deepseek_v3_tensors, {k: v for k, v in kwargs.items() if k not in _NON_DIMS})
    b = _Builder(block=kwargs.get("block", (128, 128)), scale_dtype=kwargs.get("scale_dtype", torch.float32),
                 seed=kwargs.get("seed", 0), fp8=kwargs.get("fp8", True))
    out: dict[str, torch.Tensor] = {}
    for name, t in base.items():
        out[name] = t
        if name.endswith(".self_attn.o_proj.weight_scale_inv") or (
                name.endswith(".self_attn.o_proj.weight") and not kwargs.get("fp8", True)):
            p = name[: name.index(".o_proj.")] + ".indexer"
            b.linear(f"{p}.wq_b", index_heads * index_head_dim, d["q_lora_rank"])
            b.linear(f"{p}.wk", index_head_dim, d["hidden"])
            b.bf16(f"{p}.weights_proj.weight", index_heads, d["hidden"])
            b.norm(f"{p}.k_norm.weight", index_head_dim)
            b.bias_f32(f"{p}.k_norm.bias", index_head_dim)
            out.update(b.tensors)
            b.tensors.clear()
    return out


def glm5_config(*, block: Block = (128, 128), index_heads: int = 4, index_head_dim: int = 64,
                **dims: Any) -> dict[str, Any]:
    """config.json of ``glm5_tensors(**dims)``: model_type ``glm_moe_dsa``, indexer settings,
    quantization_config with ``fmt`` and ``modules_to_not_convert``."""
    cfg = deepseek_v3_config(block=block, **dims)
    for key in ("auto_map", "topk_method", "ep_size", "moe_layer_freq"):
        cfg.pop(key)
    cfg.update(architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa", index_head_dim=index_head_dim,
               index_n_heads=index_heads, index_topk=2048, transformers_version="5.0.2.dev0")
    cfg["quantization_config"]["modules_to_not_convert"] = ["lm_head", "model.embed_tokens", "indexer.weights_proj"]
    return dict(sorted(cfg.items()))


def to_compressed_tensors(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                          *, ignore: tuple[str, ...] = ("lm_head",)) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The same block-FP8 checkpoint as llm-compressor writes it (``FP8_BLOCK`` scheme):
    ``X.weight_scale`` instead of ``X.weight_scale_inv`` (same values and dtype) and a
    ``compressed-tensors`` quantization_config with ``block_structure`` and activation groups."""
    block = list(config["quantization_config"]["weight_block_size"])
    renamed = {(n[: -len("_inv")] if n.endswith(".weight_scale_inv") else n): t for n, t in tensors.items()}
    cfg = json.loads(json.dumps(config))
    cfg["quantization_config"] = {
        "config_groups": {"group_0": {
            "format": "float-quantized", "input_activations": {
                "actorder": None, "block_structure": None, "dynamic": True, "group_size": block[1],
                "num_bits": 8, "observer": None, "observer_kwargs": {}, "strategy": "group",
                "symmetric": True, "type": "float"},
            "output_activations": None, "targets": ["Linear"],
            "weights": {"actorder": None, "block_structure": block, "dynamic": False, "group_size": None,
                        "num_bits": 8, "observer": "minmax", "observer_kwargs": {}, "strategy": "block",
                        "symmetric": True, "type": "float"}}},
        "format": "float-quantized", "global_compression_ratio": None, "ignore": list(ignore),
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.12.2",
    }
    return renamed, cfg


def deepseek_v4_tensors(*, hidden: int = 128, inter: int = 64, n_experts: int = 2, heads: int = 2,
                        head_dim: int = 64, q_lora: int = 64, vocab: int = 16,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Tiny DeepSeek-V4-Flash layout (the converter refuses it): no ``model.`` prefix, block-FP8
    attention and shared experts whose scales are ``X.scale`` in F8_E8M0, routed experts MXFP4
    packed as I8 [out, in/2] with ``.scale`` F8_E8M0 [out, in/32], BF16 embed/head."""
    g = torch.Generator().manual_seed(seed)
    e8m0 = getattr(torch, "float8_e8m0fnu")

    def fp8(n: int, k: int) -> dict[str, torch.Tensor]:
        q = (torch.randn(n, k, generator=g) * 0.5).to(FP8_DTYPE)
        return {"weight": q, "scale": torch.ones(math.ceil(n / 128), math.ceil(k / 128)).to(e8m0)}

    def fp4(n: int, k: int) -> dict[str, torch.Tensor]:
        packed = torch.randint(-128, 128, (n, k // 2), generator=g, dtype=torch.int8)
        return {"weight": packed, "scale": torch.ones(n, k // 32).to(e8m0)}

    t: dict[str, torch.Tensor] = {"embed.weight": torch.randn(vocab, hidden, generator=g).bfloat16()}
    p = "layers.0"
    for name, (n, k) in {"attn.wq_a": (q_lora, hidden), "attn.wq_b": (heads * head_dim, q_lora),
                         "attn.wkv": (head_dim, hidden), "attn.wo_a": (heads * head_dim, heads * head_dim),
                         "attn.wo_b": (hidden, heads * head_dim)}.items():
        t.update({f"{p}.{name}.{s}": v for s, v in fp8(n, k).items()})
    t[f"{p}.ffn.gate.weight"] = torch.randn(n_experts, hidden, generator=g).bfloat16()
    for e in range(n_experts):
        for w, (n, k) in {"w1": (inter, hidden), "w2": (hidden, inter), "w3": (inter, hidden)}.items():
            t.update({f"{p}.ffn.experts.{e}.{w}.{s}": v for s, v in fp4(n, k).items()})
    for w, (n, k) in {"w1": (inter, hidden), "w2": (hidden, inter), "w3": (inter, hidden)}.items():
        t.update({f"{p}.ffn.shared_experts.{w}.{s}": v for s, v in fp8(n, k).items()})
    t["head.weight"] = torch.randn(vocab, hidden, generator=g).bfloat16()
    return t


def deepseek_v4_config(*, hidden: int = 128, model_type: str = "deepseek_v4") -> dict[str, Any]:
    """config.json of ``deepseek_v4_tensors()`` (``model_type="deepseek_v41"`` for V4.1's
    nested layout with [32, 32] ue8m0 blocks and ``expert_dtype`` inside quantization_config)."""
    quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
             "weight_block_size": [128, 128]}
    if model_type == "deepseek_v41":
        quant.update(weight_block_size=[32, 32], expert_dtype="fp4")
        return {"architectures": ["DeepseekV41ForCausalLM"], "model_type": model_type,
                "text_config": {"hidden_size": hidden, "model_type": "deepseek_v41_text"},
                "quantization_config": quant}
    return {"architectures": ["DeepseekV4ForCausalLM"], "expert_dtype": "fp4", "hidden_size": hidden,
            "model_type": model_type, "quantization_config": quant}


# --------------------------------------------------------------------------------------------
# Writing a checkpoint folder


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _contiguous_shards(tensors: Mapping[str, torch.Tensor], shards: int) -> dict[str, int]:
    """Split in insertion order into ``shards`` non-empty groups of about equal bytes.

    A tensor goes to the shard where it *starts*, so a big FP8 weight crossing a boundary stays
    behind while its small scale (next in order) opens the next shard, as in real checkpoints.
    """
    if not 1 <= shards <= len(tensors):
        raise ValueError(f"cannot split {len(tensors)} tensors into {shards} non-empty shards")
    total = sum(_nbytes(t) for t in tensors.values()) or 1
    placement: dict[str, int] = {}
    shard = offset = 0
    for i, (name, t) in enumerate(tensors.items()):
        behind = offset * shards // total > shard
        if i and shard < shards - 1 and (behind or len(tensors) - i == shards - 1 - shard):
            shard += 1
        placement[name] = shard
        offset += _nbytes(t)
    return placement


def write_checkpoint(
    folder: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    shards: int = 3,
    single_file: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
    metadata: Mapping[str, str] | None = PT_METADATA,
    shard_of: Callable[[str], int] | None = None,
) -> Path:
    """Write an HF-style checkpoint folder and return its path.

    Shards are ``model-0000i-of-0000n.safetensors`` (safetensors' ``save_file``, which orders
    F32 scales before FP8 weights inside a file) plus ``model.safetensors.index.json``
    (``total_size`` = sum of tensor bytes); ``single_file`` writes ``model.safetensors`` and no
    index. Tensors are split in order into contiguous groups unless ``shard_of(name)`` returns
    a 0-based shard index. ``metadata=None`` writes no ``__metadata__``. ``extra_files`` maps
    relative paths (subfolders allowed) to contents.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata) if metadata is not None else None
    if single_file:
        save_file(dict(tensors), folder / "model.safetensors", metadata=meta)
    else:
        if shard_of is None:
            placement = _contiguous_shards(tensors, shards)
        else:
            placement = {name: shard_of(name) for name in tensors}
            bad = {n: s for n, s in placement.items() if not 0 <= s < shards}
            if bad:
                raise ValueError(f"shard_of returned indices outside 0..{shards - 1}: {bad}")
        files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        for i, file in enumerate(files):
            part = {n: t for n, t in tensors.items() if placement[n] == i}
            save_file(part, folder / file, metadata=meta)
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
            "weight_map": {n: files[placement[n]] for n in sorted(tensors)},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for rel, content in (extra_files or {}).items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"extra file path must be relative and inside the folder: {rel!r}")
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder


_PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def default_extra_files() -> dict[str, bytes]:
    """Placeholder non-weight files of a DeepSeek-V3 repo (incl. subfolders) that a converter
    must copy unchanged."""
    def js(obj: Any) -> bytes:
        return (json.dumps(obj, indent=2) + "\n").encode()

    return {
        "README.md": b"# tiny-deepseek-v3\n\nRandom tiny block-FP8 checkpoint for tests.\n",
        "tokenizer.json": js({"version": "1.0", "added_tokens": [], "normalizer": None,
                              "pre_tokenizer": None, "model": {"type": "BPE", "vocab": {},
                                                               "merges": []}}),
        "tokenizer_config.json": js({"bos_token": "<bos>", "eos_token": "<eos>",
                                     "model_max_length": 16384,
                                     "tokenizer_class": "LlamaTokenizerFast"}),
        "generation_config.json": js({"_from_model_config": True, "bos_token_id": 0,
                                      "eos_token_id": 1, "do_sample": True, "temperature": 0.6,
                                      "top_p": 0.95, "transformers_version": "4.46.3"}),
        "configuration_deepseek.py": b"# placeholder for DeepseekV3Config (remote code)\n",
        "modeling_deepseek.py": b"# placeholder for DeepseekV3ForCausalLM (remote code)\n",
        "figures/benchmark.png": _PNG_1X1,
        "inference/kernel.py": b"# placeholder: weight_dequant(x, s, block_size=128)\n",
        "inference/fp8_cast_bf16.py": b"# placeholder: FP8 -> BF16 cast using weight_dequant\n",
    }
