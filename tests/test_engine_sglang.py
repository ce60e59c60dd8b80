"""--engine sglang: the checkpoint loaded by SGLang's own layers and weight loaders, rank by rank, on the CPU.

A real-size DeepSeek-V3 checkpoint cut to one layer of each kind (dense MLP, attention, MTP layer
with two routed experts and the shared expert; real dims, random FP8 bytes) is converted to 64x64 and
checked at TP32 and TP16. SGLang is the installed one (.ci/run pins it); these tests run for real in
CI and are skipped elsewhere only when SGLang is not installed.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import io
import json
import math
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import cli, deepseek

import tiny_checkpoints as tc


# --- test harness only: SGLang's import path imports torchvision at module level (multimodal image
# transforms). PyPI's torchvision wheels are CUDA builds that do not load on the CPU torch, so an
# empty stand-in is installed here, never in the tool. Nothing in the layers checked calls it.
class _Anything:
    def __init__(self, *args, **kwargs): pass
    def __call__(self, *args, **kwargs): return _Anything()
    def __getattr__(self, name): return _Anything()
    def __mro_entries__(self, bases): return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__, module.__version__ = [], "0.0.0"   # transformers parses the version
        return module

    def exec_module(self, module): pass


def install_stubs() -> None:
    try:
        import torchvision  # noqa: F401  (a working torchvision needs no stand-in)
    except Exception:
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())


install_stubs()
try:
    import sglang.srt.layers.linear  # noqa: F401
    HAVE_SGLANG = True
except Exception as e:      # noqa: BLE001
    HAVE_SGLANG, WHY = False, f"{type(e).__name__}: {e}"
if not HAVE_SGLANG and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the engine tests but SGLang does not import: {WHY}")
needs_sglang = pytest.mark.skipif(not HAVE_SGLANG, reason="SGLang not installed (.ci/run installs it)")

import resize_block_size as rbs  # noqa: E402

# DeepSeek-V3's real dims.
V3 = dict(hidden=7168, intermediate=18432, moe_intermediate=2048, q_lora_rank=1536, kv_lora_rank=512,
          rope_dim=64, nope_dim=128, v_dim=128, num_heads=128)
DENSE_576 = "Weight output_partition_size = 576 is not divisible by weight quantization block_n = 128."
KINDS = {"dense MLP", "fused q_a_proj + kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "o_proj",
         "MTP routed experts", "MTP shared experts"}


def _random_fp8(shape: tuple[int, ...], gen: torch.Generator, pool: list) -> torch.Tensor:
    """Random e4m3 bytes, every finite value possible (0x7f/0xff are NaN and left out): a slice of
    a shared random pool at a random offset (generating 900 MB afresh would dominate the test)."""
    if not pool:
        magnitude = torch.randint(0, 0x7F, (160 << 20,), dtype=torch.uint8, generator=gen)
        pool.append(magnitude | (torch.randint(0, 2, (160 << 20,), dtype=torch.uint8, generator=gen) << 7))
    n = math.prod(shape)
    start = int(torch.randint(0, pool[0].numel() - n + 1, (1,), generator=gen))
    return pool[0][start: start + n].clone().view(torch.float8_e4m3fn).reshape(shape)


def real_size_v3(folder: Path) -> Path:
    """DeepSeek-V3 at real dims, one layer per kind: layer 0 dense with attention, layer 1 the MTP
    layer's MoE (two routed experts and the shared expert; its attention, the same shapes as layer
    0's, is left out to keep the test short: the tiny checkpoints cover MTP attention). F32 scales."""
    gen = torch.Generator().manual_seed(14)
    pool: list = []
    d = V3
    tensors: dict[str, torch.Tensor] = {}

    def fp8(name: str, n: int, k: int) -> None:
        tensors[name + ".weight"] = _random_fp8((n, k), gen, pool)
        tensors[name + ".weight_scale_inv"] = torch.rand((-(-n // 128), -(-k // 128)), generator=gen) * 1e-3

    def attention(p: str) -> None:
        fp8(f"{p}.self_attn.q_a_proj", d["q_lora_rank"], d["hidden"])
        fp8(f"{p}.self_attn.kv_a_proj_with_mqa", d["kv_lora_rank"] + d["rope_dim"], d["hidden"])
        fp8(f"{p}.self_attn.q_b_proj", d["num_heads"] * (d["nope_dim"] + d["rope_dim"]), d["q_lora_rank"])
        fp8(f"{p}.self_attn.kv_b_proj", d["num_heads"] * (d["nope_dim"] + d["v_dim"]), d["kv_lora_rank"])
        fp8(f"{p}.self_attn.o_proj", d["hidden"], d["num_heads"] * d["v_dim"])
        for norm, dim in (("q_a_layernorm", d["q_lora_rank"]), ("kv_a_layernorm", d["kv_lora_rank"])):
            tensors[f"{p}.self_attn.{norm}.weight"] = torch.ones(dim, dtype=torch.bfloat16)

    def mlp(p: str, inter: int) -> None:
        fp8(f"{p}.gate_proj", inter, d["hidden"])
        fp8(f"{p}.up_proj", inter, d["hidden"])
        fp8(f"{p}.down_proj", d["hidden"], inter)

    tensors["model.embed_tokens.weight"] = torch.zeros(16, d["hidden"], dtype=torch.bfloat16)
    attention("model.layers.0")
    mlp("model.layers.0.mlp", d["intermediate"])
    for e in range(2):
        mlp(f"model.layers.1.mlp.experts.{e}", d["moe_intermediate"])
    mlp("model.layers.1.mlp.shared_experts", d["moe_intermediate"])
    tensors["model.layers.1.mlp.gate.weight"] = torch.zeros(2, d["hidden"], dtype=torch.bfloat16)
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.zeros(2)
    tensors["model.layers.1.eh_proj.weight"] = torch.zeros(d["hidden"], 2 * d["hidden"], dtype=torch.bfloat16)
    config = tc.deepseek_v3_config(hidden=d["hidden"], intermediate=d["intermediate"],
                                   moe_intermediate=d["moe_intermediate"], n_routed_experts=2, n_shared_experts=1,
                                   num_layers=1, first_k_dense=1, num_heads=d["num_heads"],
                                   q_lora_rank=d["q_lora_rank"], kv_lora_rank=d["kv_lora_rank"],
                                   rope_dim=d["rope_dim"], nope_dim=d["nope_dim"], v_dim=d["v_dim"])
    return tc.write_checkpoint(folder, tensors, config, shards=2, extra_files={})


def run_main(*args: object) -> tuple[int, str]:
    """The command line in this process (where the torchvision stand-in is), with its stdout.
    Not conftest's cli(): a new python process lacks the stand-in, and a forked child of this
    process, once SGLang and torch run here, blocked forever on a lock some thread of this
    process held at the fork (seen on the real-size --tp 32 run)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = rbs.main([str(a) for a in args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> dict:
    """The real-size input, and its 64x64 output written by `--tp 32 --verify --engine sglang`."""
    if not HAVE_SGLANG:
        pytest.skip("SGLang not installed (.ci/run installs it)")
    root = tmp_path_factory.mktemp("engine")
    src = real_size_v3(root / "DeepSeek-V3")
    out = root / "DeepSeek-V3-Block64x64"
    code, stdout = run_main(src, "--tp", 32, "--verify", "--engine", "sglang", "-q")
    yield {"src": src, "out": out, "code": code, "stdout": stdout}
    shutil.rmtree(root, ignore_errors=True)


def _lines_by_kind(stdout: str) -> dict[str, str]:
    lines = {}
    for line in stdout.splitlines():
        for kind in KINDS:
            if line.strip().startswith(kind + " ") and not any(
                    k != kind and k.startswith(kind) and line.strip().startswith(k) for k in KINDS):
                lines[kind] = line
    return lines


@needs_sglang
def test_verify_engine_tp32_loads_every_layer_kind_of_the_64x64_output_on_32_of_32_ranks(v3):
    assert v3["code"] == 0, v3["stdout"]
    lines = _lines_by_kind(v3["stdout"])
    assert set(lines) == KINDS, v3["stdout"]
    for kind, line in lines.items():
        assert "loads on 32/32 ranks, dequantizes bit-identically to the input on ranks 0, 1, 31" in line, line
    assert "output: every layer kind loads at TP32 with sglang" in v3["stdout"]


@needs_sglang
def test_engine_refuses_the_128x128_input_at_tp32_with_sglangs_own_message(v3):
    report = rbs.engine_check(rbs.read_checkpoint(v3["src"]), 32, False, "sglang", what="input")
    dense = next(k for k in report.kinds if k.kind == "dense MLP")
    assert dense.failed_ranks == 32 and dense.loaded == 0
    assert dense.error == f"model.layers.0.mlp.gate_proj.weight: rank 0: ValueError: {DENSE_576}"
    assert not report.ok


@needs_sglang
def test_engine_tp16_loads_the_128x128_input_and_the_64x64_output(v3):
    src = rbs.read_checkpoint(v3["src"])
    for report in (rbs.engine_check(src, 16, False, "sglang"),
                   rbs.engine_check(rbs.read_checkpoint(v3["out"]), 16, False, "sglang", reference=src)):
        assert report.ok, [(k.kind, k.error, k.mismatch) for k in report.kinds]
        assert {k.kind for k in report.kinds} == KINDS
        assert all(k.loaded == 16 and k.compared_ranks == [0, 1, 15] for k in report.kinds)


@needs_sglang
def test_engine_dequantizes_each_rank_like_the_input_slice_independently_of_the_tool(v3):
    """The oracle: SGLang's rank-5 gate_up/down weights times their scales equal the input weight,
    dequantized here with torch alone, sliced the way TP32 splits it (576 rows / columns per rank)."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.runtime_context import get_parallel
    src = load_file(v3["src"] / "model-00001-of-00002.safetensors") | load_file(
        v3["src"] / "model-00002-of-00002.safetensors")
    cfg = json.loads((v3["out"] / "config.json").read_text())
    kind = rbs.LayerKind("dense MLP", "model.layers.0.mlp", "mlp",
                         tuple(f"model.layers.0.mlp.{w}" for w in ("gate_proj", "up_proj", "down_proj")))
    reader = rbs._TensorReader(rbs.read_checkpoint(v3["out"]))
    with get_parallel().override(**rbs._pose_as(32, 5, False)):
        module = rbs._sglang_module(kind, cfg, Fp8Config.from_config(cfg["quantization_config"]), 32, False)
        rbs._sglang_load(module, kind, reader.get, 5, False)
    rows = slice(5 * 576, 6 * 576)
    want = {n: tc.dequantize_block_fp8(src[f"model.layers.0.mlp.{n}.weight"],
                                       src[f"model.layers.0.mlp.{n}.weight_scale_inv"], (128, 128)).float()
            for n in ("gate_proj", "up_proj", "down_proj")}
    got_gate_up = tc.dequantize_block_fp8(module.gate_up_proj.weight.data, module.gate_up_proj.weight_scale_inv.data,
                                          (64, 64)).float()
    got_down = tc.dequantize_block_fp8(module.down_proj.weight.data, module.down_proj.weight_scale_inv.data,
                                       (64, 64)).float()
    assert torch.equal(got_gate_up, torch.cat([want["gate_proj"][rows], want["up_proj"][rows]]))
    assert torch.equal(got_down, want["down_proj"][:, rows])


@needs_sglang
def test_dry_run_engine_shows_the_inputs_error_and_that_the_planned_64x64_loads(v3, tmp_path):
    code, stdout = run_main(v3["src"], "--tp", 32, "--dry-run", "--engine", "sglang", "-o", tmp_path / "never")
    assert code == 0, stdout
    assert DENSE_576 in stdout and "FAILS on 32/32 ranks" in stdout
    assert "input as it is: does NOT load as a whole at TP32" in stdout
    assert "planned 64x64 output: every layer kind loads at TP32" in stdout
    assert not (tmp_path / "never").exists()


@needs_sglang
def test_engine_reports_a_rank_whose_scales_do_not_match_the_input(tmp_path):
    src = deepseek(tmp_path / "DeepSeek-V3")
    out = tmp_path / "out"
    cli(src, "--block-size", 32, "-o", out, "-q", check=True)
    shard = next(p for p in sorted(out.glob("*.safetensors"))
                 if "model.layers.0.mlp.down_proj.weight_scale_inv" in load_file(p))
    tensors = load_file(shard)
    scale = tensors["model.layers.0.mlp.down_proj.weight_scale_inv"]
    scale[0, 0] *= 2          # same shape, one block's value wrong: loads, but dequantizes differently
    save_file(tensors, shard, metadata={"format": "pt"})
    report = rbs.engine_check(rbs.read_checkpoint(out), 2, False, "sglang", reference=rbs.read_checkpoint(src))
    dense = next(k for k in report.kinds if k.kind == "dense MLP")
    assert dense.loaded == 2 and dense.error is None
    assert dense.mismatch and dense.mismatch.startswith("rank 0: model.layers.0.mlp: down_proj.weight")
    assert not report.ok
    assert all(k.ok for k in report.kinds if k.kind != "dense MLP")


@needs_sglang
def test_engine_with_ep_loads_each_routed_expert_whole_on_its_rank(tmp_path):
    """Experts 64 wide in 32x32 blocks cannot split over TP8 (8 rows per rank); under EP each rank
    holds whole experts, and SGLang's FusedMoE loads them (checked on the planned 32x32 output)."""
    ckpt = rbs.read_checkpoint(deepseek(tmp_path / "DeepSeek-V3"))
    tp = {k.kind: k for k in rbs.engine_check(ckpt, 8, False, "sglang", planned=(32, 32)).kinds}
    ep = {k.kind: k for k in rbs.engine_check(ckpt, 8, True, "sglang", planned=(32, 32)).kinds}
    assert tp["routed experts"].error.endswith(
        "The output_size of gate's and up's weight = 8 is not divisible by weight quantization block_n = 32.")
    for kind in ("routed experts", "MTP routed experts"):
        assert ep[kind].ok and ep[kind].loaded == 8 and ep[kind].compared_ranks == [0, 1, 7]


@needs_sglang
def test_engine_names_an_architecture_it_cannot_build_as_not_checked(tmp_path):
    src = tc.write_checkpoint(tmp_path / "MiniMax-M2", tc.minimax_m2_tensors(), tc.minimax_m2_config(), shards=1)
    code, stdout = run_main(src, "--tp", 2, "--dry-run", "--engine", "sglang")
    assert code == 1
    assert "NOT CHECKED: architecture MiniMaxM2ForCausalLM is not one this check can build" in stdout
    assert "every layer kind loads" not in stdout


@needs_sglang
def test_engine_builds_qwen3_moe_qkv_o_proj_and_experts_at_tp4(tmp_path):
    """Qwen3-MoE (BF16 scales): q/k/v through QKVParallelLinear's own loader (2 KV heads over 4 ranks
    are replicated by it), experts through FusedMoE; 128x128 fails at TP4, the planned 64x64 loads."""
    dims = dict(num_heads=4, num_kv_heads=2, moe_intermediate=256)
    ckpt = rbs.read_checkpoint(tc.write_checkpoint(tmp_path / "Qwen3-MoE", tc.qwen3_moe_tensors(**dims),
                                                   tc.qwen3_moe_config(**dims), shards=2))
    as_is = {k.kind: k for k in rbs.engine_check(ckpt, 4, False, "sglang").kinds}
    planned = rbs.engine_check(ckpt, 4, False, "sglang", planned=(64, 64))
    assert set(as_is) == {"qkv_proj (q_proj + k_proj + v_proj)", "o_proj", "routed experts"}
    assert as_is["o_proj"].error.endswith(
        "Weight input_size_per_partition = 64 is not divisible by weight quantization block_k = 128.")
    assert planned.ok and all(k.loaded == 4 and k.compared_ranks == [0, 1, 3] for k in planned.kinds)


def test_engine_without_sglang_is_one_line_and_writes_nothing(tmp_path):
    src = deepseek(tmp_path / "DeepSeek-V3")
    result = cli(src, "--tp", 2, "--verify", "--engine", "sglang", "-o", tmp_path / "out",
                 via="python", patch="sys.modules['sglang'] = None")      # `import sglang` now raises
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert result.stderr.startswith("resize-block-size: error: --engine sglang: SGLang is not importable here")
    assert "pip install --no-deps sglang==" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--engine", "sglang", "--dry-run"],
                                  ["--engine", "sglang", "--tp", "2"],
                                  ["--engine", "sglang", "--tp", "2", "--in-place"]])
def test_engine_needs_tp_and_verify_or_dry_run(tmp_path, args):
    src = deepseek(tmp_path / "DeepSeek-V3")
    result = cli(src, *args)
    assert result.returncode == 2                  # a usage error (exit-code policy)
    assert result.stderr.startswith("resize-block-size: error: --engine checks at a tensor-parallel degree")


@needs_sglang
def test_dry_run_json_carries_both_engine_reports(tmp_path):
    src = deepseek(tmp_path / "DeepSeek-V3")
    code, stdout = run_main(src, "--tp", 2, "--dry-run", "--json", "--engine", "sglang")
    info = json.loads(stdout)
    assert code == 0
    as_is, planned = info["engine_check"]
    assert (as_is["what"], as_is["ok"], planned["what"], planned["ok"]) == (
        "input as it is", False, "planned 32x32 output", True)
    assert planned["tp"] == 2 and planned["block"] == [32, 32] and all(k["loaded"] == 2 for k in planned["kinds"])


@needs_sglang
def test_engine_fails_a_checkpoint_the_advisor_passes_at_tp1(tmp_path):
    """Every split dim a multiple of 128, but q_lora_rank 64: the fused q_a + kv_a scale SGLang builds
    has ceil(256/128) = 2 rows, the checkpoint's joined scales 1 + 2 = 3. The TP advisor (split rules
    only) says TP1 needs no conversion; SGLang's own loader refuses it, and the run exits 1."""
    src = deepseek(tmp_path / "DeepSeek-V3", hidden=128, intermediate=256, moe_intermediate=128, num_heads=2,
                   q_lora_rank=64, kv_lora_rank=128, rope_dim=64, nope_dim=64, v_dim=64)
    code, stdout = run_main(src, "--tp", 1, "--verify", "--engine", "sglang")
    assert code == 1
    assert "already load at TP1; nothing to convert" in stdout
    assert "fused q_a_proj + kv_a_proj_with_mqa" in stdout and "AssertionError" in stdout
    assert "input: does NOT load as a whole at TP1" in stdout


@needs_sglang
def test_engine_names_a_missing_config_number_as_the_checkpoints_problem(tmp_path):
    src = deepseek(tmp_path / "DeepSeek-V3")
    config = json.loads((src / "config.json").read_text())
    del config["kv_lora_rank"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(rbs.ConversionError, match="config.json: kv_lora_rank is None; the engine check needs it"):
        rbs.engine_check(rbs.read_checkpoint(src), 2, False, "sglang")
