"""Input validation (issue 13 items 2, 5, 7): nothing in the input is skipped silently, nothing
hangs, every malformed input is one line on stderr before anything is created, and the output
can never be the input under another name.

Every refusal is checked the same way: non-zero exit, exactly one stderr line with the key words,
no traceback, and the folder holding the input (and the output's place) unchanged.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import pytest
from safetensors import safe_open

from conftest import cli, command, layout, snapshot, write_safetensors
from test_safety import (DOWN, INDEX, NORM, SHARD2, assert_words, error_line, hand_shards, rewrite_shard2,
                         write_hand_checkpoint)

import resize_block_size as rbs


def refused(root: Path, *args: object, words: list[str], before: Callable[[], None] | None = None,
            timeout: float = 60) -> str:
    """Run the tool, assert a clean one-line refusal with `words` that changed nothing in `root`."""
    was = snapshot(root, follow_links=False)
    # before() must act on the tool's own process (dropped capabilities, hidden modules), which a
    # new interpreter (RBS_TEST_SUBPROCESS=1) would undo: such runs are always forked
    line = error_line(cli(*args, before=before, timeout=timeout, via=None if before is None else "fork"))
    assert_words(line, words)
    assert snapshot(root, follow_links=False) == was
    return line


def converted(model: Path, out: Path, *args: object) -> None:
    result = cli(model, "-o", out, "-q", *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Reading without root's privilege to read anything (the suite may run as root)
# ---------------------------------------------------------------------------------------------

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def obey_file_permissions() -> None:
    """Make this process obey file modes even as root: drop CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (capset(2), version 3). Runs in the tool's child process (`before=`)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    drop = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= drop
    data[0].permitted &= drop
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


@pytest.fixture
def unreadable(tmp_path: Path) -> Callable[[Path], Path]:
    """chmod 000 a path for the rest of the test (restored after), once it is proven that a process
    running `obey_file_permissions` cannot read such a path here; else the test is skipped."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    code = ("import sys; sys.path.insert(0, %r); from test_input_validation import obey_file_permissions as o; o(); "
            "open(%r).read()" % (str(Path(__file__).parent), str(probe)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    probe.chmod(0o644)
    probe.unlink()
    if "PermissionError" not in result.stderr:
        pytest.skip(f"cannot make a file unreadable for this process here: {result.stderr.strip()[-200:]}")
    made: list[Path] = []

    def make(path: Path) -> Path:
        made.append(path)
        path.chmod(0)
        return path
    yield make
    for path in made:
        path.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Item 7: only regular files are read; nothing hangs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [INDEX, "config.json", SHARD2, "tokenizer.json", "sub/notes.txt"])
def test_fifo_in_the_model_folder_is_refused_without_hanging(name: str, tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    path = model / name
    path.parent.mkdir(exist_ok=True)
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    refused(tmp_path, model, "-o", tmp_path / "out", words=[name.split("/")[-1], "not a regular file"],
            timeout=20)


def test_fifo_shard_is_refused_in_dry_run_too(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    os.mkfifo(model / "model-extra.safetensors")
    refused(tmp_path, model, "--dry-run", words=["model-extra.safetensors", "not a regular file"], timeout=20)


def test_dangling_symlink_named_like_the_index_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    (model / INDEX).unlink()
    (model / INDEX).symlink_to(tmp_path / "gone.json")
    refused(tmp_path, model, "-o", tmp_path / "out", words=[INDEX, "broken symlink"])


# ---------------------------------------------------------------------------------------------
# Item 7: malformed JSON and values give one line, not a traceback
# ---------------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_config_json_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config)[:-1] + ', "deep": ' + DEEP + "}")
    refused(tmp_path, model, "-o", tmp_path / "out", words=["config.json", "nests"])


def test_config_nested_beyond_the_depth_bound_is_refused(tmp_path: Path) -> None:
    """Deep enough for json.loads, too deep to trust json.dumps and comparisons later on."""
    model = write_hand_checkpoint(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["deep"] = json.loads("[" * 500 + "]" * 500)
    (model / "config.json").write_text(json.dumps(config))
    refused(tmp_path, model, "-o", tmp_path / "out", words=["config.json", "nests JSON more than 100 levels"])


def test_deeply_nested_index_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    index = (model / INDEX).read_text().rstrip()
    (model / INDEX).write_text(index[:-1] + ', "deep": ' + DEEP + "}")
    refused(tmp_path, model, "-o", tmp_path / "out", words=[INDEX, "nests"])


def test_deeply_nested_shard_header_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    write_safetensors(model / SHARD2, ('{"x": ' + DEEP + "}").encode())
    refused(tmp_path, model, "-o", tmp_path / "out", words=[SHARD2, "nests JSON too deeply"])


def test_dtype_that_is_a_list_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")

    def edit(header: dict, data: bytes) -> tuple[dict, bytes]:
        header[NORM]["dtype"] = ["BF16"]
        return header, data
    rewrite_shard2(model, edit)
    refused(tmp_path, model, "-o", tmp_path / "out", words=[SHARD2, NORM, "unknown dtype", "['BF16']"])


def test_lone_surrogate_in_a_tensor_name_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    header, data = layout(hand_shards()[SHARD2])
    raw = json.dumps(header, separators=(",", ":")).replace(NORM, "model.norm\\ud800.weight")
    write_safetensors(model / SHARD2, raw.encode(), data)
    refused(tmp_path, model, "-o", tmp_path / "out", words=[SHARD2, "model.norm", "surrogate"])


@pytest.mark.parametrize("text", ["²", "64x", "0", "-64", "6 4 4", "٦٤", "99999999999999999999"])
def test_block_size_that_is_not_ascii_positive_integers_is_refused(text: str, tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    refused(tmp_path, model, f"--block-size={text}", words=["--block-size", repr(text)])


def test_block_size_parse_takes_separators_and_whitespace() -> None:
    assert [rbs.parse_block_size(t) for t in ("64", " 64x128 ", "64,128", "64 X 128", "32 64")] == \
        [(64, 64), (64, 128), (64, 128), (64, 128), (32, 64)]


def test_huge_weight_block_size_is_refused_before_the_output_exists(tmp_path: Path) -> None:
    """[2**62, 2**62] used to pass validation, create OUTPUT, then die of MemoryError."""
    model = write_hand_checkpoint(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [2 ** 62, 2 ** 62]
    (model / "config.json").write_text(json.dumps(config))
    refused(tmp_path, model, "-o", tmp_path / "out", words=["config.json", "weight_block_size", str(2 ** 62)])


def test_empty_input_is_refused_not_taken_as_the_current_folder(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    was = snapshot(tmp_path, follow_links=False)
    for args in (["", "--in-place"], ["", "-o", tmp_path / "out"], ["", "--dry-run"]):
        line = error_line(cli(*args, cwd=model))
        assert_words(line, ["INPUT is empty"])
    assert snapshot(tmp_path, follow_links=False) == was


# ---------------------------------------------------------------------------------------------
# Item 2 and 7: nothing skipped silently; unreadable is an error before the output exists
# ---------------------------------------------------------------------------------------------

def test_unreadable_tokenizer_is_refused_before_any_shard_is_written(tmp_path: Path, unreadable) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    unreadable(_write(model / "tokenizer.json", "{}"))
    refused(tmp_path, model, "-o", tmp_path / "out", words=["tokenizer.json", "Permission denied"],
            before=obey_file_permissions)


def test_unlistable_subfolder_is_refused_not_skipped(tmp_path: Path, unreadable) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    _write(model / "original" / "params.json", "{}")
    unreadable(model / "original")
    refused(tmp_path, model, "-o", tmp_path / "out", words=[str(model / "original"), "cannot list"],
            before=obey_file_permissions)


def test_unlistable_subfolder_is_refused_in_dry_run(tmp_path: Path, unreadable) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    _write(model / "original" / "params.json", "{}")
    unreadable(model / "original")
    refused(tmp_path, model, "--dry-run", words=["original", "cannot list"], before=obey_file_permissions)


def test_unreadable_file_with_a_newline_in_its_name_is_one_line(tmp_path: Path, unreadable) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    unreadable(_write(model / "notes\nmore.txt", "x"))
    refused(tmp_path, model, "-o", tmp_path / "out", words=["notes more.txt"], before=obey_file_permissions)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_folder_named_like_the_state_folder_is_copied(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    _write(model / ".resize_block_size_notes" / "notes.txt", "kept")
    _write(model / ".resize_block_sizes" / "a.txt", "kept too")
    converted(model, tmp_path / "out", "--verify")
    assert (tmp_path / "out" / ".resize_block_size_notes" / "notes.txt").read_text() == "kept"
    assert (tmp_path / "out" / ".resize_block_sizes" / "a.txt").read_text() == "kept too"


def test_git_folder_and_state_folder_are_not_copied(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    _write(model / ".git" / "HEAD", "ref: refs/heads/main\n")
    converted(model, tmp_path / "out")
    assert not (tmp_path / "out" / ".git").exists()


def test_1500_nested_subfolders_are_copied(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    deep = model
    for _ in range(1500):          # one by one: mkdir(parents=True) itself recurses
        deep = deep / "d"
        deep.mkdir()
    (deep / "leaf.txt").write_text("bottom")
    try:
        converted(model, tmp_path / "out", "--verify")
        assert (tmp_path / "out").joinpath(*["d"] * 1500, "leaf.txt").read_text() == "bottom"
    finally:                       # rm(1) walks any depth; shutil.rmtree (pytest's clean-up) recurses
        subprocess.run(["rm", "-rf", str(model), str(tmp_path / "out")], check=True)


def test_symlinked_subfolder_that_loops_back_into_the_input_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    (model / "sub").mkdir()
    (model / "sub" / "back").symlink_to(model)
    refused(tmp_path, model, "-o", tmp_path / "out", words=[str(model / "sub" / "back"), "loop"])


def test_symlinked_subfolder_to_a_folder_outside_is_copied_twice_if_linked_twice(tmp_path: Path) -> None:
    """Two links to the same folder are two copies (the old walk silently dropped the second)."""
    model = write_hand_checkpoint(tmp_path / "model")
    _write(tmp_path / "shared" / "tokenizer.json", '{"t": 1}')
    (model / "a").symlink_to(tmp_path / "shared")
    (model / "b").symlink_to(tmp_path / "shared")
    converted(model, tmp_path / "out", "--verify")
    for sub in ("a", "b"):
        assert (tmp_path / "out" / sub / "tokenizer.json").read_text() == '{"t": 1}'
        assert not (tmp_path / "out" / sub).is_symlink()


# ---------------------------------------------------------------------------------------------
# Item 2: file names that are not UTF-8 are copied as they are
# ---------------------------------------------------------------------------------------------

LATIN1 = b"notes-\xe9t\xe9.txt"


def _latin1_model(tmp_path: Path) -> Path:
    model = write_hand_checkpoint(tmp_path / "model")
    with open(os.path.join(os.fsencode(model), LATIN1), "wb") as f:
        f.write(b"caf\xe9")
    os.mkdir(os.path.join(os.fsencode(model), b"sub\xff"))
    with open(os.path.join(os.fsencode(model), b"sub\xff", b"x\xfe"), "wb") as f:
        f.write(b"deep")
    return model


def test_file_names_that_are_not_utf8_are_copied_byte_for_byte(tmp_path: Path) -> None:
    model = _latin1_model(tmp_path)
    out = tmp_path / "out"
    converted(model, out, "--verify")
    with open(os.path.join(os.fsencode(out), LATIN1), "rb") as f:
        assert f.read() == b"caf\xe9"
    with open(os.path.join(os.fsencode(out), b"sub\xff", b"x\xfe"), "rb") as f:
        assert f.read() == b"deep"


def test_dry_run_and_json_survive_names_that_are_not_utf8(tmp_path: Path) -> None:
    model = _latin1_model(tmp_path)
    latin_model = Path(os.fsdecode(os.fsencode(model) + b"-\xe9"))
    model.rename(latin_model)
    for env in ({}, {"LC_ALL": "C", "PYTHONUTF8": "0"}):
        for json_flag in ([], ["--json"]):
            result = subprocess.run(command(latin_model, "--dry-run", *json_flag),      # bytes: names are not UTF-8
                                    capture_output=True, env={**os.environ, **env})
            assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
            assert os.fsencode(latin_model) in result.stdout or json_flag
            if json_flag:
                assert json.loads(result.stdout)["other_files"] == 2


# ---------------------------------------------------------------------------------------------
# Item 5: the output is never the input, whatever the aliasing
# ---------------------------------------------------------------------------------------------

def test_output_inside_a_symlinked_alias_of_the_input_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    (tmp_path / "alias").symlink_to(model)
    refused(tmp_path, model, "-o", tmp_path / "alias" / "converted", words=["inside the input folder"])


def test_identity_catches_an_alias_that_realpath_does_not_resolve(tmp_path: Path, monkeypatch) -> None:
    """Stand-in for any alias realpath cannot see through (bind mounts, other mounts of the same
    filesystem): with realpath blinded, only (st_dev, st_ino) can tell it is the input."""
    model = write_hand_checkpoint(tmp_path / "model")
    (tmp_path / "alias").symlink_to(model)
    monkeypatch.setattr(rbs.os.path, "realpath", os.path.abspath)
    with pytest.raises(rbs.ConversionError, match="inside the input folder"):
        rbs.check_output_location(model, tmp_path / "alias" / "converted")
    with pytest.raises(rbs.ConversionError, match="is the input folder"):
        rbs.check_output_location(model, tmp_path / "alias")
    (tmp_path / "up").symlink_to(tmp_path)
    with pytest.raises(rbs.ConversionError, match="contains the input folder"):
        rbs.check_output_location(model, tmp_path / "up")


@pytest.fixture
def bind_alias(tmp_path: Path):
    """`tmp_path/alias` bind-mounted onto `tmp_path/model` (a checkpoint), or a skip saying why."""
    model = write_hand_checkpoint(tmp_path / "model")
    alias = tmp_path / "alias"
    alias.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mount --bind needs root and mount(8); the identity logic is tested without it above")
    result = subprocess.run(["mount", "--bind", str(model), str(alias)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount --bind is not permitted here: {result.stderr.strip()}")
    try:
        yield model, alias
    finally:
        subprocess.run(["umount", str(alias)], check=False)


def test_output_inside_a_bind_mount_of_the_input_is_refused(bind_alias, tmp_path: Path) -> None:
    model, alias = bind_alias
    assert os.path.realpath(alias) != os.path.realpath(model)      # realpath cannot see it
    was = snapshot(model, follow_links=False)
    line = error_line(cli(model, "-o", alias / "converted"))
    assert_words(line, ["inside the input folder"])
    assert snapshot(model, follow_links=False) == was


def test_symlinked_subfolder_leading_into_the_output_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    converted(model, out)
    (model / "linked").symlink_to(out)
    refused(tmp_path, model, "-o", out, words=[str(model / "linked"), "output folder"])


def test_symlinked_subfolder_to_a_folder_holding_the_output_is_refused(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    (tmp_path / "data").mkdir()
    (model / "linked").symlink_to(tmp_path / "data")
    refused(tmp_path, model, "-o", tmp_path / "data" / "out", words=[str(model / "linked"), "output folder"])


# ---------------------------------------------------------------------------------------------
# Issue 12: the dtype table is the one the installed safetensors library knows
# ---------------------------------------------------------------------------------------------

def _library_dtypes() -> dict[str, int]:
    """Every dtype name the installed safetensors writes for some torch dtype, with its bits per
    element as the library lays it out (bytes it stores * 8 / elements in the shape)."""
    import torch
    from safetensors.torch import save
    found: dict[str, int] = {}
    for value in vars(torch).values():
        if not isinstance(value, torch.dtype):
            continue
        try:
            with warnings.catch_warnings():            # experimental/deprecated torch dtypes
                warnings.simplefilter("ignore")
                blob = save({"t": torch.zeros(8, dtype=value)})
        except Exception:              # a torch dtype safetensors has no name for
            continue
        (n,) = struct.unpack("<Q", blob[:8])
        entry = json.loads(blob[8: 8 + n])["t"]
        elements = math.prod(entry["shape"])
        found[entry["dtype"]] = (entry["data_offsets"][1] - entry["data_offsets"][0]) * 8 // elements
    return found


def test_every_dtype_the_safetensors_library_writes_is_in_the_table_with_its_width() -> None:
    library = _library_dtypes()
    assert {"F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E4M3", "BF16"} <= set(library)   # the probe found them
    assert {name: rbs.DTYPE_BITS.get(name) for name in library} == library


@pytest.mark.parametrize("dtype", sorted(rbs.DTYPE_BITS))
def test_every_dtype_in_the_table_is_one_the_safetensors_library_opens(dtype: str, tmp_path: Path) -> None:
    nbytes = 8 * rbs.DTYPE_BITS[dtype] // 8
    path = write_safetensors(tmp_path / "t.safetensors",
                             {"t": {"dtype": dtype, "shape": [8], "data_offsets": [0, nbytes]}}, bytes(nbytes))
    with safe_open(path, framework="numpy") as f:
        assert f.get_slice("t").get_dtype() == dtype


# ---------------------------------------------------------------------------------------------
# Item 4: outputs obey the safetensors header limit
# ---------------------------------------------------------------------------------------------

def _shard2_with_header_of(model: Path, size: int, metadata: dict) -> None:
    """Shard 2 rewritten with a header JSON of exactly `size` bytes, grown by a long
    `__metadata__` string (the cheapest way to a header near the 100 MB limit)."""
    header, data = layout(hand_shards()[SHARD2], {**metadata, "notes": ""})
    body = len(json.dumps(header, separators=(",", ":")))
    header["__metadata__"]["notes"] = "x" * (size - body)
    write_safetensors(model / SHARD2, header, data)
    assert (model / SHARD2).stat().st_size == 8 + size + len(data)


def test_output_header_over_the_safetensors_limit_is_refused_before_writing(tmp_path: Path) -> None:
    """An input header just under the limit, without `format`: the output adds "format":"pt"."""
    model = write_hand_checkpoint(tmp_path / "model")
    _shard2_with_header_of(model, rbs.MAX_HEADER_BYTES - 8, {})
    with safe_open(model / SHARD2, framework="numpy") as f:     # the input itself is valid
        assert f.metadata()["notes"].startswith("x")
    refused(tmp_path, model, "-o", tmp_path / "out", words=[SHARD2, "header", "100000000", "safetensors"])


def test_output_header_near_the_limit_drops_alignment_padding_and_opens(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    _shard2_with_header_of(model, rbs.MAX_HEADER_BYTES - 8, {"format": "pt"})
    out = tmp_path / "out"
    converted(model, out)
    with open(out / SHARD2, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    assert rbs.MAX_HEADER_BYTES - rbs.ALIGN < header_len <= rbs.MAX_HEADER_BYTES
    with safe_open(out / SHARD2, framework="pt") as f:
        assert list(f.get_slice(DOWN + "_scale_inv").get_shape()) == [4, 3]
        assert f.get_tensor(NORM).shape == (128,)


# ---------------------------------------------------------------------------------------------
# --verify: read back with the safetensors library, against a fresh listing of the input
# ---------------------------------------------------------------------------------------------

def test_verify_summary_names_the_library_that_read_the_headers(tmp_path: Path) -> None:
    import safetensors
    model = write_hand_checkpoint(tmp_path / "model")
    result = cli(model, "-o", tmp_path / "out", "--verify")
    assert result.returncode == 0, result.stderr
    assert f"read back with safetensors {safetensors.__version__}" in result.stdout


@pytest.mark.parametrize("module", ["safetensors", "numpy"])
def test_verify_without_the_safetensors_library_is_refused_before_converting(module: str, tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")

    def hide() -> None:
        sys.modules[module] = None             # `import MODULE` now raises ImportError
    refused(tmp_path, model, "-o", tmp_path / "out", "--verify", words=["safetensors", "pip install", module],
            before=hide)


def test_verify_reports_input_files_added_after_the_conversion_in_subfolders(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    converted(model, out)
    _write(model / "original" / "params.json", "{}")
    result = cli(model, "-o", out, "--verify")
    assert result.returncode != 0 and "verified" not in result.stdout
    assert "original/params.json: in the input but missing from the output" in result.stderr


def test_verify_reports_files_in_the_output_that_are_not_in_the_input(tmp_path: Path) -> None:
    model = write_hand_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    converted(model, out)
    _write(out / "sub" / "stray.bin", "?")
    result = cli(model, "-o", out, "--verify")
    assert result.returncode != 0 and "verified" not in result.stdout
    assert "sub/stray.bin: in the output but not in the input" in result.stderr


def test_verify_reports_an_output_shard_the_library_refuses(tmp_path: Path) -> None:
    """A header our own parser would take but the library does not: a lone surrogate in a name."""
    model = write_hand_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    converted(model, out)
    raw = (out / SHARD2).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8: 8 + n].replace(b'"model.norm.weight"', b'"model.norm.\\ud800"')    # same length
    (out / SHARD2).write_bytes(raw[:8] + header + raw[8 + n:])
    result = cli(model, "-o", out, "--verify")
    assert result.returncode != 0 and "verified" not in result.stdout
    line = next(line for line in result.stderr.splitlines() if SHARD2 in line)
    assert_words(line, ["surrogate", "safetensors"])


def test_os_error_message_naming_a_file_with_a_newline_is_one_line() -> None:
    error = OSError(13, "Permission denied", "/models/x/notes\nmore.txt")
    assert "\n" not in rbs._describe_os_error(error)
    assert "notes more.txt" in rbs._describe_os_error(error)


@pytest.mark.parametrize("fp8", ["F8_E4M3FNUZ", "F8_E5M2FNUZ"])
def test_fnuz_checkpoint_converts_with_weights_unchanged_and_scales_replicated(fp8: str, tmp_path: Path) -> None:
    """A checkpoint of AMD's FP8 variants (safetensors >= 0.7 writes them) used to be refused as
    'unknown dtype'; the block grid does not depend on the element format."""
    import torch
    shards = hand_shards()
    for tensors in shards.values():
        for name, (dtype, shape, raw) in list(tensors.items()):
            if dtype == "F8_E4M3":
                tensors[name] = (fp8, shape, raw)
    model = write_hand_checkpoint(tmp_path / "model", shards)
    out = tmp_path / "out"
    converted(model, out, "--verify")
    with safe_open(model / SHARD2, framework="pt") as a, safe_open(out / SHARD2, framework="pt") as b:
        weight, new = a.get_tensor(DOWN), b.get_tensor(DOWN)
        assert weight.dtype == new.dtype == getattr(torch, "float8_" + fp8[3:].lower().replace("_", ""))
        assert torch.equal(weight.view(torch.uint8), new.view(torch.uint8))
        scale = a.get_tensor(DOWN + "_scale_inv")
        expected = scale.repeat_interleave(2, 0).repeat_interleave(2, 1)[:4, :3]
        assert torch.equal(b.get_tensor(DOWN + "_scale_inv"), expected)
