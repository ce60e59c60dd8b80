"""What a conversion produces, checked bit for bit against the input.

Every expectation is computed here, from the input checkpoint and the block arithmetic, never
copied from the code under test:

* a block-FP8 weight dequantizes as ``fp8 * scale of its block`` (float32); converting must leave
  that value bit-identical for every weight;
* a weight [..., N, K] at blocks (bn', bk') has scales [..., ceil(N/bn'), ceil(K/bk')], and the
  new block starting at row i*bn' lies in the old block floor(i*bn'/bn), so its scale is that one;
* everything that is not a scale (FP8 bytes, BF16/F32 tensors, other files) is byte-identical,
  config.json differs only in the numbers of weight_block_size, and the input is never touched.

The checkpoints are tiny but real: DeepSeek-V3 names (MLA attention, dense and MoE layers,
routed and shared experts, BF16 router, F32 e_score_correction_bias, MTP layer), genuine block
quantization, several shards, dims that are not multiples of 128 or 64, F32/BF16/F16/E8M0 scales.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, cli, deepseek, dequantized, load_all, read_header, snapshot, tc

import resize_block_size as rbs

SOURCE = (128, 128)
INDEX = "model.safetensors.index.json"
SCALE = "_scale_inv"

# kv_a_proj_with_mqa has kv_lora_rank + rope_dim = 576 rows, as in DeepSeek-V3 (5 scale rows at
# 128, 9 at 64). 576, 192 and 320 are multiples of 64 but not of 128.
DIMS_576 = dict(hidden=320, intermediate=576, moe_intermediate=192, kv_lora_rank=512, rope_dim=64)
# Dims that are not multiples of 64 either: scale grids must be trimmed on both axes.
DIMS_ODD = dict(hidden=130, intermediate=100, moe_intermediate=100, q_lora_rank=100)

# Shard placement for the DIMS_576 checkpoints: embeddings + layer 0 | layer 1 | the rest (norm,
# lm_head, MTP layer 2), except a few scales stored away from their weight.
MOVED_SCALES = {
    "model.layers.2.self_attn.kv_a_proj_with_mqa.weight_scale_inv": 0,   # weight in shard 2
    "model.layers.1.mlp.experts.1.down_proj.weight_scale_inv": 0,        # weight in shard 1
    "model.layers.0.mlp.down_proj.weight_scale_inv": 1,                  # weight in shard 0
}
EARLY_SCALE = "model.layers.2.self_attn.kv_a_proj_with_mqa.weight_scale_inv"


def by_layer(name: str) -> int:
    if name in MOVED_SCALES:
        return MOVED_SCALES[name]
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return min(int(m.group(1)), 2)
    return 0 if name == "model.embed_tokens.weight" else 2


# ---------------------------------------------------------------------------------------------
# Helpers: raw tensors, bit views, the expected scale
# ---------------------------------------------------------------------------------------------

def raw_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (safetensors dtype, shape, raw bytes) for every tensor of every shard."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        _, entries, start = read_header(shard)
        data = shard.read_bytes()
        for name, e in entries.items():
            b, end = e["data_offsets"]
            out[name] = (e["dtype"], tuple(e["shape"]), data[start + b: start + end])
    return out


def names_per_shard(folder: Path) -> dict[str, set[str]]:
    return {s.name: set(read_header(s)[1]) for s in sorted(folder.glob("*.safetensors"))}


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers, so equality is bit equality (-0.0 != 0.0, any dtype)."""
    return t.contiguous().view(_INT[t.element_size()])


def expected_scale(scale: torch.Tensor, weight_shape: tuple[int, ...], target: tuple[int, int],
                   source: tuple[int, int] = SOURCE) -> torch.Tensor:
    """The new scale grid, as bit patterns: new block (i, j) starts at row i*bn', column j*bk',
    which lie in old block (i*bn' // bn, j*bk' // bk); it takes that block's scale."""
    rows = math.ceil(weight_shape[-2] / target[0])
    cols = math.ceil(weight_shape[-1] / target[1])
    old_row = torch.arange(rows) * target[0] // source[0]
    old_col = torch.arange(cols) * target[1] // source[1]
    return bits(scale).index_select(-2, old_row).index_select(-1, old_col)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def block_of(folder: Path) -> list[int]:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["weight_block_size"]


def assert_dequantizes_identically(src: Path, out: Path) -> None:
    before, after = dequantized(src), dequantized(out)
    assert before and set(after) == set(before)
    for name, value in before.items():
        assert after[name].dtype == torch.float32
        assert torch.equal(bits(after[name]), bits(value)), name


def assert_scales_replicated(src: Path, out: Path, target: tuple[int, int]) -> None:
    before, after = load_all(src), load_all(out)
    scales = [n for n in before if n.endswith(SCALE)]
    assert scales
    for name in scales:
        weight_shape = tuple(before[name[: -len(SCALE)]].shape)
        assert after[name].dtype == before[name].dtype, name
        assert torch.equal(bits(after[name]), expected_scale(before[name], weight_shape, target)), name


# ---------------------------------------------------------------------------------------------
# The main conversions: two dim sets x three scale dtypes x three targets (each pair met once)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    dims: dict
    scale_dtype: torch.dtype
    args: tuple[str, ...]           # how the target is asked for on the command line
    target: tuple[int, int]
    metadata: dict | None           # shard __metadata__ of the input
    shards: int
    shard_of: object = None

    @property
    def rows576(self) -> bool:
        return self.dims is DIMS_576


PT = {"format": "pt"}
EXTRA_META = {"format": "pt", "producer": "tiny-deepseek", "quantizer": "block-fp8 128x128"}
CASES = [
    Case("576-f32-default64", DIMS_576, torch.float32, (), (64, 64), PT, 3, by_layer),
    Case("576-bf16-32", DIMS_576, torch.bfloat16, ("--block-size", "32"), (32, 32), None, 3, by_layer),
    Case("576-f16-64,128", DIMS_576, torch.float16, ("--block-size", "64,128"), (64, 128), EXTRA_META, 3,
         by_layer),
    Case("odd-f16-64x64", DIMS_ODD, torch.float16, ("--block-size", "64x64"), (64, 64), None, 4),
    Case("odd-f32-32", DIMS_ODD, torch.float32, ("--block-size", "32"), (32, 32), EXTRA_META, 3),
    Case("odd-bf16-64,128", DIMS_ODD, torch.bfloat16, ("--block-size", "64,128"), (64, 128), PT, 2),
]


@dataclass
class Converted:
    case: Case
    src: Path
    out: Path
    config: dict
    before: dict                    # snapshot(src, follow_links=False, mtimes=True) before the run
    result: subprocess.CompletedProcess


def build_and_convert(case: Case, tmp: Path) -> Converted:
    src = tmp / "DeepSeek-V3"
    config = tc.deepseek_v3_config(**case.dims)
    tc.write_checkpoint(src, tc.deepseek_v3_tensors(scale_dtype=case.scale_dtype, **case.dims), config,
                        shards=case.shards, shard_of=case.shard_of, metadata=case.metadata,
                        extra_files=tc.default_extra_files())
    before = snapshot(src, follow_links=False, mtimes=True)
    out = tmp / "out"
    result = cli(src, *case.args, "-o", out, check=True)
    return Converted(case, src, out, config, before, result)


@pytest.fixture(scope="module")
def _conversions(tmp_path_factory):
    cache: dict[str, Converted] = {}

    def get(case: Case) -> Converted:
        if case.id not in cache:
            cache[case.id] = build_and_convert(case, tmp_path_factory.mktemp(case.id))
        return cache[case.id]
    return get


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def conv(request, _conversions) -> Converted:
    return _conversions(request.param)


@pytest.fixture(scope="module", params=[c for c in CASES if c.rows576],
                ids=[c.id for c in CASES if c.rows576])
def conv576(request, _conversions) -> Converted:
    return _conversions(request.param)


def test_every_fp8_weight_dequantizes_bit_identically(conv):
    assert_dequantizes_identically(conv.src, conv.out)
    assert block_of(conv.out) == list(conv.case.target)


def test_every_scale_has_the_engine_shape_of_the_target_block(conv):
    bn, bk = conv.case.target
    weights = {n: t for n, t in raw_tensors(conv.src).items() if t[0] == "F8_E4M3"}
    out = raw_tensors(conv.out)
    assert weights
    for name, (_, (n, k), _) in weights.items():
        assert out[name + SCALE][1] == (math.ceil(n / bn), math.ceil(k / bk)), name


def test_every_scale_is_the_replicated_and_trimmed_source_scale(conv):
    assert_scales_replicated(conv.src, conv.out, conv.case.target)


def test_scale_dtype_is_kept(conv):
    expected = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[conv.case.scale_dtype]
    dtypes = {t[0] for n, t in raw_tensors(conv.out).items() if n.endswith(SCALE)}
    assert dtypes == {expected}


def test_non_scale_tensors_are_byte_identical(conv):
    before, after = raw_tensors(conv.src), raw_tensors(conv.out)
    others = [n for n in before if not n.endswith(SCALE)]
    # The realistic non-FP8 tensors are all there: router, bias, norms, embeddings, MTP.
    dtypes = {before[n][0] for n in others}
    assert dtypes == {"F8_E4M3", "BF16", "F32"}
    for name in others:
        assert after[name] == before[name], name


def test_tensor_names_per_shard_are_identical(conv):
    assert names_per_shard(conv.out) == names_per_shard(conv.src)
    assert len(names_per_shard(conv.src)) == conv.case.shards


def test_shard_metadata_is_kept_and_format_pt_added_when_absent(conv):
    for shard in sorted(conv.src.glob("*.safetensors")):
        meta_in = read_header(shard)[0]
        assert meta_in == conv.case.metadata                    # the input is as built
        expected = {"format": "pt"} if meta_in is None else meta_in
        assert read_header(conv.out / shard.name)[0] == expected, shard.name


def test_config_json_differs_only_in_weight_block_size_numbers(conv):
    in_text = (conv.src / "config.json").read_text()
    assert in_text == json.dumps(conv.config, indent=2) + "\n"
    new = json.loads(json.dumps(conv.config))
    new["quantization_config"]["weight_block_size"] = list(conv.case.target)
    assert (conv.out / "config.json").read_text() == json.dumps(new, indent=2) + "\n"


def test_index_weight_map_is_kept_and_total_size_is_the_real_tensor_bytes(conv):
    index_in = json.loads((conv.src / INDEX).read_text())
    index_out = json.loads((conv.out / INDEX).read_text())
    assert index_out["weight_map"] == index_in["weight_map"]
    real = sum(t.numel() * t.element_size() for t in load_all(conv.out).values())
    assert index_out["metadata"]["total_size"] == real
    assert real > index_in["metadata"]["total_size"]             # the scales grew


def test_every_other_file_and_subfolder_is_copied_byte_identical(conv):
    converted = {p.name for p in conv.src.glob("*.safetensors")} | {"config.json", INDEX}
    before = {k: v for k, v in snapshot(conv.src).items() if k not in converted}
    after = {k: v for k, v in snapshot(conv.out).items() if k not in converted}
    assert {"figures/benchmark.png", "inference/kernel.py", "inference/fp8_cast_bf16.py"} <= set(before)
    assert after == before


def test_output_shards_open_with_safe_open(conv):
    for shard in sorted(conv.out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            names = list(f.keys())
            assert set(names) == set(read_header(conv.src / shard.name)[1])
            for name in names:
                f.get_tensor(name)


def test_input_folder_is_byte_identical_with_unchanged_mtimes(conv):
    assert snapshot(conv.src, follow_links=False, mtimes=True) == conv.before


def test_summary_line_mentions_shards_scales_and_bytes(conv):
    shards = len(list(conv.src.glob("*.safetensors")))
    scales = sum(n.endswith(SCALE) for n in raw_tensors(conv.src))
    out = conv.result.stdout
    assert re.search(rf"\b{shards} shards\b", out), out
    assert re.search(rf"\b{scales} scales\b", out), out
    units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
    amounts = [float(v) * units[u] for v, u in re.findall(r"(\d+(?:\.\d+)?) ?(B|kB|MB|GB)\b", out)]
    total = folder_bytes(conv.out)
    assert any(abs(a - total) <= 0.1 * total for a in amounts), (out, total)


def test_test_checkpoints_stay_small(conv):
    assert folder_bytes(conv.src) < 4e6
    assert folder_bytes(conv.out) < 5e6


def test_scale_stored_in_an_earlier_shard_than_its_weight_is_replicated(conv576):
    weight_map = json.loads((conv576.src / INDEX).read_text())["weight_map"]
    weight = EARLY_SCALE[: -len(SCALE)]
    assert weight_map[EARLY_SCALE] < weight_map[weight]        # the input really is laid out so
    in_scale = load_all(conv576.src)[EARLY_SCALE]
    with safe_open(conv576.out / weight_map[EARLY_SCALE], framework="pt") as f:
        out_scale = f.get_tensor(EARLY_SCALE)
    with safe_open(conv576.src / weight_map[weight], framework="pt") as f:
        weight_shape = tuple(f.get_slice(weight).get_shape())
    assert torch.equal(bits(out_scale), expected_scale(in_scale, weight_shape, conv576.case.target))


# By hand: 576 rows / 320 columns -> 5 x 3 scales at 128x128, 9 x 5 at 64x64, 18 x 10 at 32x32,
# 9 x 3 at 64x128.
KV_A_SCALE = {(64, 64): (9, 5), (32, 32): (18, 10), (64, 128): (9, 3)}


def test_kv_a_proj_with_mqa_576_rows_get_9_scale_rows_at_64_not_10(conv576):
    before, after = raw_tensors(conv576.src), raw_tensors(conv576.out)
    for layer in (0, 1, 2):
        name = f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight"
        assert before[name][1] == (576, 320)
        assert before[name + SCALE][1] == (5, 3)
        assert after[name + SCALE][1] == KV_A_SCALE[conv576.case.target]


# ---------------------------------------------------------------------------------------------
# Output location and the two ways to run the command
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, args, expected", [
    (None, [], "DeepSeek-V3-Block64x64"),                            # absolute path
    ("DeepSeek-V3/", [], "DeepSeek-V3-Block64x64"),
    ("DeepSeek-V3", ["--block-size", "32"], "DeepSeek-V3-Block32x32"),
    ("DeepSeek-V3", ["--block-size", "64,128"], "DeepSeek-V3-Block64x128"),
], ids=["absolute", "relative-trailing-slash", "32", "64,128"])
def test_default_output_is_the_sibling_named_after_the_block(ckpt, tmp_path, given, args, expected):
    cli(given or ckpt, *args, cwd=tmp_path, check=True)
    assert sorted(os.listdir(tmp_path)) == sorted([ckpt.name, expected])
    out = tmp_path / expected
    assert block_of(out) == [int(x) for x in expected.split("Block")[1].split("x")]
    assert names_per_shard(out) == names_per_shard(ckpt)


def test_output_option_writes_to_the_given_folder_only(ckpt, tmp_path):
    out = tmp_path / "elsewhere" / "R1-small-blocks"
    cli(ckpt, "-o", out, check=True)
    assert sorted(os.listdir(tmp_path)) == sorted([ckpt.name, "elsewhere"])
    assert block_of(out) == [64, 64]
    assert_dequantizes_identically(ckpt, out)


def test_console_script_behaves_like_python_resize_block_size_py(ckpt, tmp_path):
    via_python = cli(ckpt, "--block-size", "32", "-o", tmp_path / "a", via="python")
    via_script = cli(ckpt, "--block-size", "32", "-o", tmp_path / "b", via="script")
    assert via_python.returncode == via_script.returncode == 0, (via_python.stderr, via_script.stderr)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")

    def normal(text: str, out: str) -> str:
        return re.sub(r"\d+\.\d+ s\b", "T s", text.replace(out, "OUT"))
    assert normal(via_python.stdout, str(tmp_path / "a")) == normal(via_script.stdout, str(tmp_path / "b"))
    assert via_python.stdout.strip()


# ---------------------------------------------------------------------------------------------
# Other input layouts
# ---------------------------------------------------------------------------------------------

def test_single_file_checkpoint_converts(tmp_path):
    src = tc.write_checkpoint(tmp_path / "single", tc.deepseek_v3_tensors(**DIMS_ODD),
                              tc.deepseek_v3_config(**DIMS_ODD), single_file=True)
    out = tmp_path / "out"
    cli(src, "-o", out, check=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert_dequantizes_identically(src, out)
    assert_scales_replicated(src, out, (64, 64))
    assert read_header(out / "model.safetensors")[0] == read_header(src / "model.safetensors")[0]


def as_hf_cache(plain: Path, repo: Path, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Re-lay `plain` like huggingface_hub's cache: content in blobs/<sha256>, and
    snapshots/<revision>/<path> as relative symlinks into ../../blobs. Returns the snapshot."""
    snap = repo / "snapshots" / revision
    for file in sorted(p for p in plain.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / file.relative_to(plain)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap


def test_hf_cache_snapshot_of_symlinks_converts_to_real_files(tmp_path):
    plain = deepseek(tmp_path / "plain", **DIMS_ODD)
    repo = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V3"
    snap = as_hf_cache(plain, repo)
    assert os.readlink(snap / "config.json").startswith("../../blobs/")
    assert os.readlink(snap / "inference" / "kernel.py").startswith("../../../blobs/")
    before = snapshot(repo, follow_links=False, mtimes=True)

    out = tmp_path / "out"
    cli(snap, "-o", out, check=True)

    assert [p for p in out.rglob("*") if p.is_symlink()] == []
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(plain).as_posix() for p in plain.rglob("*") if p.is_file())
    converted = {p.name for p in plain.glob("*.safetensors")} | {"config.json", INDEX}
    for rel in files:
        if rel not in converted:
            assert (out / rel).read_bytes() == (plain / rel).read_bytes(), rel
    assert names_per_shard(out) == names_per_shard(plain)
    assert_scales_replicated(plain, out, (64, 64))
    assert_dequantizes_identically(plain, out)
    assert snapshot(repo, follow_links=False, mtimes=True) == before


# ---------------------------------------------------------------------------------------------
# Output on the terminal, re-runs
# ---------------------------------------------------------------------------------------------

def test_quiet_prints_nothing(ckpt, tmp_path):
    result = cli(ckpt, "--quiet", "-o", tmp_path / "out")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert block_of(tmp_path / "out") == [64, 64]


def test_progress_bar_counts_bytes_and_rate_once_the_run_lasts(capsys):
    bar = rbs.progress_bar(5_000_000, "converting", quiet=False, delay=0)
    bar.update(2_000_000)
    bar.update(3_000_000)
    bar.close()
    err = capsys.readouterr().err
    assert "converting" in err and "5.00M/5.00M" in err and "B/s" in err, err


def test_progress_bar_stays_hidden_for_a_run_shorter_than_its_delay_and_with_quiet(capsys):
    bar = rbs.progress_bar(100, "converting", quiet=False, delay=60)
    bar.update(100)
    bar.close()
    assert bar.n == 100
    assert rbs.progress_bar(100, "converting", quiet=True, delay=0) is None
    assert capsys.readouterr().err == ""


def test_rerun_on_finished_output_says_already_converted_and_rewrites_nothing(ckpt, tmp_path):
    out = tmp_path / "out"
    cli(ckpt, "-o", out, check=True)
    done = snapshot(out, follow_links=False, mtimes=True)
    again = cli(ckpt, "-o", out)
    assert again.returncode == 0, again.stderr
    assert "already converted" in (again.stdout + again.stderr).lower()
    assert snapshot(out, follow_links=False, mtimes=True) == done


# ---------------------------------------------------------------------------------------------
# Other scale formats and layouts
# ---------------------------------------------------------------------------------------------

# A DeepSeek-V3.1-like config written by hand: 4-space indentation, one-line arrays, scale_fmt,
# modules_to_not_convert after weight_block_size, and a decoy [128, 128] array before it.
V31_CONFIG = """{
    "architectures": ["DeepseekV3ForCausalLM"],
    "head_dims": [128, 128],
    "hidden_size": 130,
    "model_type": "deepseek_v3",
    "num_hidden_layers": 2,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [%d, %d],
        "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.gate", "model.norm"]
    },
    "torch_dtype": "bfloat16",
    "vocab_size": 16
}
"""


@pytest.fixture(scope="module")
def v31(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint with power-of-two scales stored as F8_E8M0 and the hand-written config."""
    if not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("this torch has no float8_e8m0fnu")
    tmp = tmp_path_factory.mktemp("v31")
    tensors = tc.deepseek_v3_tensors(power_of_two_scales=True, **DIMS_ODD)
    for name, t in tensors.items():
        if name.endswith(SCALE):
            e8 = t.to(torch.float8_e8m0fnu)
            assert torch.equal(e8.float(), t), name          # powers of two: stored exactly
            tensors[name] = e8
    src = tc.write_checkpoint(tmp / "DeepSeek-V3.1", tensors, tc.deepseek_v3_config(**DIMS_ODD), shards=3)
    (src / "config.json").write_text(V31_CONFIG % (128, 128))
    out = tmp / "out"
    cli(src, "-o", out, check=True)
    return src, out


def test_e8m0_scales_are_replicated_byte_exactly(v31):
    src, out = v31
    before, after = raw_tensors(src), raw_tensors(out)
    scales = [n for n in before if n.endswith(SCALE)]
    assert scales and {before[n][0] for n in scales} == {"F8_E8M0"}
    for name in scales:
        dtype, shape, data = before[name]
        weight_shape = before[name[: -len(SCALE)]][1]
        expected = expected_scale(torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape),
                                  weight_shape, (64, 64))
        assert after[name][0] == "F8_E8M0"
        assert after[name][1] == tuple(expected.shape)
        assert after[name][2] == expected.numpy().tobytes(), name
    assert_dequantizes_identically(src, out)


def test_config_text_keeps_indentation_key_order_and_one_line_arrays(v31):
    src, out = v31
    assert (out / "config.json").read_text() == V31_CONFIG % (64, 64)


def stacked_expert_tensors() -> dict[str, torch.Tensor]:
    """A MoE layer whose experts are stored stacked: [E, N, K] FP8 weights with
    [E, ceil(N/128), ceil(K/128)] scales, next to ordinary 2-D and BF16 tensors."""
    g = torch.Generator().manual_seed(7)
    experts, hidden, inter = 3, 130, 96

    def weight(*shape: int) -> torch.Tensor:
        gain = torch.exp2(torch.rand(*shape[:-1], 1, generator=g) * 4 - 2)
        return (torch.randn(*shape, generator=g) * 0.02 * gain).bfloat16()

    tensors = {"model.embed_tokens.weight": weight(16, hidden),
               "model.layers.0.mlp.gate.weight": weight(experts, hidden)}
    for name, shape in (("model.layers.0.mlp.experts.gate_up_proj.weight", (experts, 2 * inter, hidden)),
                        ("model.layers.0.mlp.experts.down_proj.weight", (experts, hidden, inter)),
                        ("model.layers.0.self_attn.o_proj.weight", (hidden, 192))):
        q, s = tc.quantize_block_fp8(weight(*shape), SOURCE)
        tensors[name], tensors[name + SCALE] = q, s
    return tensors


def test_stacked_3d_expert_weights_convert(tmp_path):
    src = tc.write_checkpoint(tmp_path / "stacked", stacked_expert_tensors(), tc.deepseek_v3_config(), shards=2)
    assert raw_tensors(src)["model.layers.0.mlp.experts.gate_up_proj.weight" + SCALE][1] == (3, 2, 2)
    out = tmp_path / "out"
    cli(src, "-o", out, check=True)
    after = raw_tensors(out)
    assert after["model.layers.0.mlp.experts.gate_up_proj.weight" + SCALE][1] == (3, 3, 3)
    assert after["model.layers.0.mlp.experts.down_proj.weight" + SCALE][1] == (3, 3, 2)
    assert_scales_replicated(src, out, (64, 64))
    assert_dequantizes_identically(src, out)


# ---------------------------------------------------------------------------------------------
# The committed example
# ---------------------------------------------------------------------------------------------

EXAMPLE = ROOT / "examples" / "tiny-deepseek-v3"


def readme_command() -> list[str]:
    """The `resize-block-size examples/...` command of the README's "Try it" block (after
    `pip install . &&`), without comment."""
    readme = (ROOT / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("pip install . && resize-block-size examples/")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#")[0].split("&&")[1])


def test_example_converts_with_the_readme_command(tmp_path):
    command = readme_command()
    assert command == ["resize-block-size", "examples/tiny-deepseek-v3", "--tp", "32"]
    default_out = ROOT / "examples" / "tiny-deepseek-v3-Block64x64"
    existed = default_out.exists()
    before = snapshot(EXAMPLE, follow_links=False, mtimes=True)
    out = tmp_path / "tiny-deepseek-v3-Block64x64"
    result = cli(*command[1:], "-o", out, cwd=ROOT, via="script")
    assert result.returncode == 0, result.stderr
    assert block_of(out) == [64, 64]
    assert_dequantizes_identically(EXAMPLE, out)
    assert_scales_replicated(EXAMPLE, out, (64, 64))
    assert snapshot(EXAMPLE, follow_links=False, mtimes=True) == before
    assert default_out.exists() == existed


def test_make_tiny_deepseek_regenerates_the_committed_example_byte_identically(tmp_path):
    out = tmp_path / "regen"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_deepseek.py"), str(out)],
                   check=True, capture_output=True)
    assert snapshot(out) == snapshot(EXAMPLE)
