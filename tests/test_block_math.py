"""The block math, without files: engine scale shapes, and scale replication checked against
torch's repeat_interleave + trim (the rule the engines' loaders are written against)."""
from __future__ import annotations

import math

import pytest
import torch

import resize_block_size as rbs

DTYPE_OF = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def grid(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale shape of a weight, worked out here (not with the tool's scale_shape): leading
    dims kept, then ceil(rows / block rows) x ceil(cols / block cols)."""
    *lead, rows, cols = weight_shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


@pytest.mark.parametrize("shape, block, expected", [
    ((576, 7168), (128, 128), (5, 56)),       # DeepSeek kv_a_proj_with_mqa
    ((576, 7168), (64, 64), (9, 112)),
    ((18432, 7168), (64, 64), (288, 112)),    # dense gate/up
    ((100, 130), (64, 64), (2, 3)),
    ((8, 2048, 7168), (128, 128), (8, 16, 56)),  # stacked experts keep the leading dim
])
def test_scale_shape_is_ceil_of_each_dim_over_the_block(shape, block, expected):
    assert rbs.scale_shape(shape, block) == expected


@pytest.mark.parametrize("weight_shape", [(576, 7168), (192, 130), (100, 320), (64, 64), (3, 130, 100)])
@pytest.mark.parametrize("source, target", [((128, 128), (64, 64)), ((128, 128), (32, 32)),
                                            ((128, 128), (64, 128)), ((128, 128), (128, 16))])
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_resized_scale_equals_repeat_interleave_then_trim(weight_shape, source, target, dtype):
    old_shape = grid(weight_shape, source)
    new_shape = grid(weight_shape, target)
    scale = torch.rand(old_shape).to(DTYPE_OF[dtype]) + 0.5
    f0, f1 = source[0] // target[0], source[1] // target[1]
    expected = scale.repeat_interleave(f0, -2).repeat_interleave(f1, -1)[..., : new_shape[-2], : new_shape[-1]]
    got = rbs.resize_scale_bytes(raw(scale), dtype, old_shape, new_shape, source, target)
    assert got == raw(expected)
    assert len(got) == math.prod(new_shape) * scale.element_size()


@pytest.mark.parametrize("weight_shape", [(576, 7168), (192, 130), (100, 320), (3, 130, 100)])
def test_going_back_recovers_the_original_scale_exactly(weight_shape):
    small, large = (64, 64), (128, 128)
    original = torch.rand(grid(weight_shape, large))
    grown = rbs.resize_scale_bytes(raw(original), "F32", original.shape, grid(weight_shape, small), large, small)
    back = rbs.resize_scale_bytes(grown, "F32", grid(weight_shape, small), original.shape, small, large)
    assert back == raw(original)


def test_going_back_refuses_a_scale_that_is_not_a_replication():
    genuine_64 = torch.arange(1.0, 1.0 + 9 * 112).reshape(9, 112)    # every 64x64 block its own scale
    assert rbs.resize_scale_bytes(raw(genuine_64), "F32", (9, 112), (5, 56), (64, 64), (128, 128)) is None


def test_going_back_accepts_the_lone_trimmed_edge_row_and_refuses_a_broken_pair():
    grown = torch.ones(9, 2)   # 576 rows: 64x64 rows 0..7 are pairs, row 8 is the trimmed half of a 128 block
    grown[8, :] = 2.0
    assert rbs.resize_scale_bytes(raw(grown), "F32", (9, 2), (5, 1), (64, 64), (128, 128)) is not None
    grown[7, 1] = 3.0          # row 7 must repeat row 6
    assert rbs.resize_scale_bytes(raw(grown), "F32", (9, 2), (5, 1), (64, 64), (128, 128)) is None
