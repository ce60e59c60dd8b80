"""The four ways unchanged bytes reach the output (copy-on-write clone, O_DIRECT writes, in-kernel
copy_file_range, buffered read/write) write the same bytes, for the dtype-grouped layout safetensors writes and for
a layout with scales interleaved between weights; on XFS the clone shares the unchanged bytes."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import resize_block_size as rbs
from conftest import ROOT, dequantized, layout, read_header, snapshot, tc, write_safetensors

METHODS = ("reflink", "direct", "copy_file_range", "buffered")
# Expert-sized tensors (a few MB) so that whole 4 KiB blocks can be shared.
SHAPES = {"gate_proj": (1024, 1792), "down_proj": (1792, 1024)}


def expert_tensors(layers: int = 2, experts: int = 2) -> dict[str, torch.Tensor]:
    """Random FP8 experts with real block scales; 1792 is a multiple of 64 but not of 128."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for e in range(experts):
            for proj, shape in SHAPES.items():
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                w = torch.randn(shape, generator=g).to(torch.bfloat16)
                tensors[name], tensors[name + "_scale_inv"] = tc.quantize_block_fp8(w, (128, 128))
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(1792, dtype=torch.bfloat16)
    return tensors


def write_interleaved(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A shard whose data goes weight, its scale, next weight, ... (not safetensors' dtype order)."""
    order = sorted(tensors, key=lambda n: (n.removesuffix("_scale_inv"), n.endswith("_scale_inv")))
    dtypes = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16"}
    raw = {n: tensors[n].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for n in order}
    write_safetensors(path, *layout({n: (dtypes[tensors[n].dtype], list(tensors[n].shape), raw[n]) for n in order}))


def make_checkpoint(folder: Path, *, interleaved: bool) -> Path:
    """Two shards of experts, in the chosen layout, with config, index and a tokenizer file."""
    folder.mkdir(parents=True)
    tensors = expert_tensors()
    weight_map = {}
    for i, layer in enumerate((0, 1)):
        shard = {n: t for n, t in tensors.items() if n.startswith(f"model.layers.{layer}.")}
        name = f"model-0000{i + 1}-of-00002.safetensors"
        if interleaved:
            write_interleaved(folder / name, shard)
        else:
            save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(tc.deepseek_v3_config(), indent=2))
    (folder / "tokenizer.json").write_text("{}")
    return folder


BLOCK = 4096       # the filesystem block: copy-on-write shares whole blocks only


def copied_tensors(source: Path, output: Path) -> list[tuple[int, int, int]]:
    """(source offset, output offset, length) of every tensor the conversion copies unchanged
    (all but the `_scale_inv` ones), from the two files' headers, checking that its bytes are equal."""
    _, src, src_start = read_header(source)
    _, out, out_start = read_header(output)
    copied = []
    with open(source, "rb") as fs, open(output, "rb") as fo:
        for name, entry in out.items():
            if name.endswith("_scale_inv"):
                continue
            (sb, se), (ob, oe) = src[name]["data_offsets"], entry["data_offsets"]
            assert se - sb == oe - ob and os.pread(fs.fileno(), se - sb, src_start + sb) == \
                os.pread(fo.fileno(), oe - ob, out_start + ob), name
            copied.append((src_start + sb, out_start + ob, se - sb))
    return sorted(copied, key=lambda c: c[1])


def shareable_bytes(source: Path, output: Path) -> int:
    """What copy-on-write can share between a source shard and its conversion: the unchanged
    tensors form runs that are contiguous in both files; a run whose source and output offsets
    agree modulo the block size shares the whole blocks inside it."""
    runs: list[list[int]] = []
    for src, dst, length in copied_tensors(source, output):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1][2] += length
        else:
            runs.append([src, dst, length])
    shared = 0
    for src, dst, length in runs:
        if (src - dst) % BLOCK == 0:
            head = -src % BLOCK
            shared += max(0, (length - head) // BLOCK * BLOCK)
    return shared


def convert_with(method: str, source: Path, output: Path) -> rbs.Summary:
    plan = rbs.make_plan(rbs.read_checkpoint(source), output, (64, 64))
    return rbs.convert(plan, copy=method, quiet=True)


@pytest.mark.parametrize("interleaved", [False, True], ids=["dtype-grouped", "interleaved"])
def test_every_copy_path_writes_the_same_bytes(tmp_path: Path, interleaved: bool) -> None:
    source = make_checkpoint(tmp_path / "in", interleaved=interleaved)
    outputs = {}
    for method in METHODS:       # on ext4 a requested clone falls back to copy_file_range
        convert_with(method, source, tmp_path / method)
        outputs[method] = snapshot(tmp_path / method)
    assert outputs["reflink"] == outputs["direct"] == outputs["copy_file_range"] == outputs["buffered"]
    before, after = dequantized(source), dequantized(tmp_path / "buffered")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_buffered_loop_takes_over_when_the_kernel_refuses_copy_file_range(tmp_path: Path, monkeypatch) -> None:
    source = make_checkpoint(tmp_path / "in", interleaved=True)
    convert_with("copy_file_range", source, tmp_path / "kernel")

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    summary = convert_with("copy_file_range", source, tmp_path / "fallback")
    assert summary.method == "buffered"
    assert snapshot(tmp_path / "fallback") == snapshot(tmp_path / "kernel")


@pytest.fixture
def direct_io(tmp_path: Path) -> None:
    """Skip, saying why, where tmp_path's filesystem takes no O_DIRECT write."""
    if not rbs.probe_direct(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT writes")


@pytest.mark.parametrize("interleaved", [False, True], ids=["dtype-grouped", "interleaved"])
def test_direct_writes_from_the_source_mapping_or_an_aligned_buffer_give_the_same_bytes(
        tmp_path: Path, interleaved: bool, direct_io: None, monkeypatch) -> None:
    source = make_checkpoint(tmp_path / "in", interleaved=interleaved)
    calls = {"mapped": 0, "buffer": 0}
    for name, key in (("_direct_from_source", "mapped"), ("_direct_through_buffer", "buffer")):
        real = getattr(rbs.ByteCopier, name)

        def counted(*args, real=real, key=key):
            calls[key] += 1
            return real(*args)
        monkeypatch.setattr(rbs.ByteCopier, name, counted)
    direct = convert_with("direct", source, tmp_path / "direct")
    buffered = convert_with("buffered", source, tmp_path / "buffered")
    assert direct.method == "direct"                 # no silent fallback
    assert calls["mapped"] > 0
    # Interleaved scales shift weights by 2560 mod 4096, so most go through the aligned buffer.
    assert (calls["buffer"] > 0) == interleaved
    assert direct.bytes_written == buffered.bytes_written
    assert snapshot(tmp_path / "direct") == snapshot(tmp_path / "buffered")


def test_auto_picks_direct_io_where_blocks_cannot_be_shared(tmp_path: Path, direct_io: None) -> None:
    source = make_checkpoint(tmp_path / "in", interleaved=False)
    shard = next(source.glob("*.safetensors"))
    if rbs.probe_reflink(shard, tmp_path):
        pytest.skip(f"{tmp_path} can clone blocks, so auto rightly picks reflink")
    assert rbs.choose_copy_method("auto", shard, tmp_path) == "direct"
    assert rbs.choose_copy_method("no-share", shard, tmp_path) == "direct"


def test_a_source_that_cannot_be_mapped_goes_through_the_aligned_buffer(
        tmp_path: Path, direct_io: None, monkeypatch) -> None:
    source = make_checkpoint(tmp_path / "in", interleaved=False)
    convert_with("buffered", source, tmp_path / "buffered")
    real = rbs.mmap.mmap

    def no_file_maps(fileno: int, *args, **kwargs):
        if fileno != -1:
            raise OSError(errno.ENODEV, "No such device")
        return real(fileno, *args, **kwargs)
    monkeypatch.setattr(rbs.mmap, "mmap", no_file_maps)
    summary = convert_with("direct", source, tmp_path / "unmapped")
    assert summary.method == "direct"
    assert snapshot(tmp_path / "unmapped") == snapshot(tmp_path / "buffered")


def test_buffered_loop_takes_over_when_the_kernel_refuses_o_direct(tmp_path: Path, monkeypatch) -> None:
    source = make_checkpoint(tmp_path / "in", interleaved=False)
    convert_with("buffered", source, tmp_path / "buffered")
    real = rbs.set_direct

    def refuse(fd: int, on: bool) -> None:
        if on:
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, on)
    monkeypatch.setattr(rbs, "set_direct", refuse)
    summary = convert_with("direct", source, tmp_path / "fallback")
    assert summary.method == "buffered"
    assert snapshot(tmp_path / "fallback") == snapshot(tmp_path / "buffered")


def test_a_refusal_in_the_middle_of_a_direct_run_finishes_that_run_buffered(
        tmp_path: Path, direct_io: None, monkeypatch) -> None:
    source = make_checkpoint(tmp_path / "in", interleaved=False)
    convert_with("buffered", source, tmp_path / "buffered")
    monkeypatch.setattr(rbs, "DIRECT_CHUNK", 64 << 10)      # several chunks per run
    real, calls = rbs.ByteCopier._direct_from_source, []

    def refuse_third(*args) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise OSError(errno.EINVAL, "Invalid argument")
        real(*args)
    monkeypatch.setattr(rbs.ByteCopier, "_direct_from_source", refuse_third)
    summary = convert_with("direct", source, tmp_path / "fallback")
    assert len(calls) == 3 and summary.method == "buffered"
    assert snapshot(tmp_path / "fallback") == snapshot(tmp_path / "buffered")


@pytest.mark.parametrize("method", METHODS)
def test_a_source_shard_cut_short_during_the_run_is_a_one_line_error(tmp_path: Path, method: str) -> None:
    source = make_checkpoint(tmp_path / "in", interleaved=False)
    plan = rbs.make_plan(rbs.read_checkpoint(source), tmp_path / "out", (64, 64))
    shard = source / plan.shards[0].name
    os.truncate(shard, shard.stat().st_size - 100_000)          # after planning: the header still agrees
    with pytest.raises(rbs.ConversionError, match="changed during the run"):
        rbs.convert(plan, copy=method, quiet=True)
    assert not (tmp_path / "out" / plan.shards[0].name).exists()


def test_dtype_grouped_shards_are_laid_out_so_almost_every_unchanged_byte_can_be_shared(tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "in", interleaved=False)
    convert_with("buffered", source, tmp_path / "out")
    for shard in sorted(source.glob("*.safetensors")):
        output = tmp_path / "out" / shard.name
        unchanged = sum(length for _, _, length in copied_tensors(shard, output))
        # At most one partial 4 KiB block at each end of the single run of weights is copied.
        assert shareable_bytes(shard, output) >= unchanged - 2 * BLOCK, shard.name
        assert read_header(output)[2] % 8 == 0           # data start stays 8-byte aligned


def fiemap_shared_bytes(path: Path) -> int:
    """Bytes of `path` in extents the filesystem flags as shared (FIEMAP): the benchmark's own
    measure, the filesystem's report and not the tool's count."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench import file_shared_bytes
    return file_shared_bytes(path)


@pytest.fixture
def xfs(tmp_path: Path):
    """A loop-mounted XFS (reflink is on by default), or a skip saying why there is none."""
    if os.geteuid() != 0:
        pytest.skip("XFS loop mount needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs not installed (apt-get install xfsprogs)")
    image, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(400 << 20)
    made = subprocess.run(["mkfs.xfs", "-q", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("interleaved", [False, True], ids=["dtype-grouped", "interleaved"])
def test_reflink_on_xfs_shares_unchanged_bytes_and_writes_the_same_bytes(xfs: Path, interleaved: bool) -> None:
    source = make_checkpoint(xfs / "in", interleaved=interleaved)
    shared = convert_with("auto", source, xfs / "auto")
    assert shared.method == "reflink"
    copied = convert_with("copy_file_range", source, xfs / "copied")
    buffered = convert_with("buffered", source, xfs / "buffered")
    assert copied.bytes_shared == buffered.bytes_shared == 0
    assert snapshot(xfs / "auto") == snapshot(xfs / "copied") == snapshot(xfs / "buffered")
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    unchanged = sum(length for n in shards for _, _, length in copied_tensors(source / n, xfs / "auto" / n))
    expected = sum(shareable_bytes(source / n, xfs / "auto" / n) for n in shards)
    assert shared.bytes_shared == expected
    for n in shards:        # what XFS really shares: also a last partial block that ends both files
        assert 0 <= fiemap_shared_bytes(xfs / "auto" / n) - shareable_bytes(source / n, xfs / "auto" / n) < BLOCK, n
    if not interleaved:
        assert shared.bytes_shared >= 0.99 * unchanged


def test_what_reflink_cannot_share_on_xfs_is_written_with_o_direct(xfs: Path, monkeypatch) -> None:
    source = make_checkpoint(xfs / "in", interleaved=True)     # most weights do not line up
    written = []
    real = rbs.ByteCopier._direct

    def spy(self, src_fd, dst_fd, src, dst, length):
        done = real(self, src_fd, dst_fd, src, dst, length)
        written.append(done)
        return done
    monkeypatch.setattr(rbs.ByteCopier, "_direct", spy)
    summary = convert_with("auto", source, xfs / "auto")
    assert summary.method == "reflink" and summary.bytes_shared > 0
    not_shared = summary.bytes_written - summary.bytes_shared      # copied weights, plus headers and scales
    assert sum(written) >= 0.9 * not_shared - (1 << 20), (sum(written), not_shared)
    monkeypatch.undo()
    convert_with("buffered", source, xfs / "buffered")
    assert snapshot(xfs / "auto") == snapshot(xfs / "buffered")


def test_reflinked_output_takes_almost_no_new_disk_on_xfs(xfs: Path) -> None:
    source = make_checkpoint(xfs / "in", interleaved=False)
    os.sync()
    free_before = shutil.disk_usage(xfs).free
    convert_with("auto", source, xfs / "out")
    os.sync()
    used = free_before - shutil.disk_usage(xfs).free
    input_bytes = sum(f.stat().st_size for f in source.iterdir())
    assert used < 0.05 * input_bytes, (used, input_bytes)


def test_no_reflink_writes_real_copies_on_xfs(xfs: Path) -> None:
    source = make_checkpoint(xfs / "in", interleaved=False)
    (source / "tokenizer.json").write_bytes(os.urandom(1 << 20))   # copied from offset 0: aligned
    os.sync()
    free_before = shutil.disk_usage(xfs).free
    plan = rbs.make_plan(rbs.read_checkpoint(source), xfs / "out", (64, 64))
    summary = rbs.convert(plan, copy="no-share", quiet=True)
    os.sync()
    used = free_before - shutil.disk_usage(xfs).free
    input_bytes = sum(f.stat().st_size for f in source.iterdir())
    assert summary.method == "direct" and summary.bytes_shared == 0
    assert used >= 0.95 * input_bytes, (used, input_bytes)
