"""The command line as people and scripts run it (issue 11): Hugging Face cache inputs, --json in
every mode, the exit-code policy, flag combinations, --dry-run's view of the output folder, --force,
the messages that say what to do next, broken pipes, the serving hint, and the README's quick start.

Runs go through the console script's entry point `main_exit()` in a forked child (conftest's
`cli()`), and through the installed `resize-block-size` script itself where the process matters:
the Hugging Face cache environment (read when huggingface_hub is imported) and pipes."""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import ROOT, cli, command, deepseek, dequantized, snapshot, start, tc

REPO = "deepseek-ai/DeepSeek-V3"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
STATE = ".resize_block_size"
ERROR = "resize-block-size: error: "
EXAMPLE = ROOT / "examples" / "tiny-deepseek-v3"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_snapshot(cache: Path, repo: str, commit: str, model: Path, refs: tuple[str, ...] = ()) -> Path:
    """Put `model` into a Hugging Face hub cache the way huggingface_hub lays it out: files in
    blobs/ named by their sha256, snapshots/<commit>/ of relative symlinks, refs/<branch>."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / commit
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        rel = path.relative_to(model)
        blob = repo_dir / "blobs" / sha(path)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path: Path) -> dict:
    """A hub cache holding two revisions of one repo: main -> A, branch dev -> B (other weights)."""
    hub = tmp_path / "hub"
    model_a = deepseek(tmp_path / "src-a")
    model_b = tc.write_checkpoint(tmp_path / "src-b", tc.deepseek_v3_tensors(seed=7), tc.deepseek_v3_config(),
                                  shards=3, extra_files=tc.default_extra_files())
    snap_a = add_snapshot(hub, REPO, COMMIT_A, model_a, refs=("main",))
    snap_b = add_snapshot(hub, REPO, COMMIT_B, model_b, refs=("dev",))
    work = tmp_path / "work"
    work.mkdir()
    return {"hub": hub, "a": model_a, "b": model_b, "snap_a": snap_a, "snap_b": snap_b, "work": work}


def hub_env(hub: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(hub), **extra)
    return env


def json_of(result: subprocess.CompletedProcess) -> dict:
    """The one JSON object on stdout, checked against the exit code."""
    data = json.loads(result.stdout)
    assert data["exit_code"] == result.returncode, result.stdout
    assert data["ok"] is (result.returncode == 0), result.stdout
    return data


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and lines[0].startswith(ERROR), result.stderr
    return lines[0]


def converted(src: Path, out: Path) -> None:
    """`out` is a complete 64x64 conversion of `src`: every weight dequantizes identically."""
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [64, 64]
    a, b = dequantized(src), dequantized(out)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)


def file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def interrupted_by_full_disk(args: list, limit: int) -> subprocess.CompletedProcess:
    """Run until a file would pass `limit` bytes (EFBIG, as on a full disk), which stops the run."""
    result = cli(*args, before=file_size_limit(limit))
    assert result.returncode == 1 and "re-run the same command" in result.stderr, result.stderr
    return result


# ---------------------------------------------------------------------------------------------
# 1. Repo ids and the Hugging Face cache
# ---------------------------------------------------------------------------------------------

def test_repo_id_is_found_in_hf_hub_cache_and_output_goes_to_the_current_folder(cache):
    before = snapshot(cache["hub"], follow_links=False)
    result = cli(REPO, cwd=cache["work"], env=hub_env(cache["hub"]), check=True, via="script")
    out = cache["work"] / "DeepSeek-V3-Block64x64"
    converted(cache["a"], out)
    assert str(out) in result.stdout                     # the summary says where it went
    assert snapshot(cache["hub"], follow_links=False) == before     # nothing written inside the cache
    assert not any(p.is_symlink() for p in out.rglob("*"))


@pytest.mark.parametrize("revision", ["dev", COMMIT_B], ids=["branch", "commit"])
def test_repo_id_at_revision_converts_that_snapshot(cache, revision):
    cli(f"{REPO}@{revision}", cwd=cache["work"], env=hub_env(cache["hub"]), check=True, via="script")
    converted(cache["b"], cache["work"] / "DeepSeek-V3-Block64x64")


def test_models_folder_of_the_cache_converts_the_main_snapshot(cache):
    repo_dir = cache["hub"] / ("models--" + REPO.replace("/", "--"))
    cli(repo_dir, cwd=cache["work"], env=hub_env(cache["hub"]), check=True, via="script")
    converted(cache["a"], cache["work"] / "DeepSeek-V3-Block64x64")


def test_repo_id_is_found_under_hf_home_when_hf_hub_cache_is_unset(cache, tmp_path):
    home = tmp_path / "hf-home"
    home.mkdir()
    cache["hub"].rename(home / "hub")
    env = hub_env(home, HF_HOME=str(home))
    del env["HF_HUB_CACHE"]
    cli(REPO, cwd=cache["work"], env=env, check=True, via="script")
    converted(cache["a"], cache["work"] / "DeepSeek-V3-Block64x64")


@pytest.mark.parametrize("given, download", [
    ("deepseek-ai/DeepSeek-R1", "download deepseek-ai/DeepSeek-R1"),
    (REPO + "@no-such-branch", f"download {REPO} --revision no-such-branch"),
], ids=["repo", "revision"])
def test_repo_id_not_in_the_cache_says_so_and_how_to_download_it(cache, given, download):
    before = snapshot(cache["hub"], follow_links=False)
    result = cli(given, cwd=cache["work"], env=hub_env(cache["hub"]), via="script")
    line = one_error_line(result)
    assert line.startswith(ERROR + given + ": ") and "not in the Hugging Face cache" in line
    assert re.search(r"\((hf|huggingface-cli) " + re.escape(download) + r"\)", line), line
    assert str(cache["hub"]) in line
    assert list(cache["work"].iterdir()) == [] and snapshot(cache["hub"], follow_links=False) == before


def test_huggingface_hub_is_not_imported_for_a_model_folder(ckpt, tmp_path):
    at_exit = "import atexit\natexit.register(lambda: print('huggingface_hub' in sys.modules))"
    result = cli(ckpt, "-o", tmp_path / "out", "-q", via="python", patch=at_exit, check=True)
    assert result.stdout == "False\n"
    assert (tmp_path / "out" / "config.json").exists()


def test_snapshot_folder_as_input_writes_the_default_output_outside_the_cache(cache):
    before = snapshot(cache["hub"], follow_links=False)
    result = cli(cache["snap_a"], "--dry-run", cwd=cache["work"], env=hub_env(cache["hub"]), check=True,
                 via="script")
    out = cache["work"] / "DeepSeek-V3-Block64x64"
    assert f"-> {out}" in result.stdout.splitlines()[0]          # the plan names it
    cli(cache["snap_a"], cwd=cache["work"], env=hub_env(cache["hub"]), check=True, via="script")
    converted(cache["a"], out)
    assert snapshot(cache["hub"], follow_links=False) == before


def test_in_place_on_a_cache_snapshot_is_refused_before_anything_is_written(cache):
    before = snapshot(cache["hub"], follow_links=False)
    result = cli(cache["snap_a"], "--in-place", cwd=cache["work"], env=hub_env(cache["hub"]), via="script")
    line = one_error_line(result)
    assert "symlinks" in line and "shared with the cache" in line and "-o ./DeepSeek-V3-Block64x64" in line
    assert snapshot(cache["hub"], follow_links=False) == before      # no state folder, no file changed
    assert list(cache["work"].iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 2. --json in every mode, one exit-code policy, every flag combination works or is refused
# ---------------------------------------------------------------------------------------------

def test_json_conversion_summary(ckpt, tmp_path):
    data = json_of(cli(ckpt, "-o", tmp_path / "out", "--json"))
    assert data["outcome"] == "converted" and data["output"] == str(tmp_path / "out")
    assert data["summary"]["shards_written"] == 3 and data["summary"]["outcome"] == "converted"
    assert data["summary"]["method"] in ("reflink", "direct", "copy_file_range", "buffered")
    assert data["serve"]["tp"] >= 1


def test_json_rerun_on_a_finished_output_says_already_complete(ckpt, tmp_path):
    cli(ckpt, "-o", tmp_path / "out", "-q", check=True)
    data = json_of(cli(ckpt, "-o", tmp_path / "out", "--json"))
    assert data["outcome"] == "already complete" and data["summary"]["shards_kept"] == 3


def test_json_dry_run_is_the_plan(ckpt, tmp_path):
    data = json_of(cli(ckpt, "-o", tmp_path / "out", "--dry-run", "--json"))
    assert data["outcome"] == "planned" and data["shards"] == 3 and data["target_block"] == [64, 64]
    assert data["output_state"]["state"] == "new"
    assert not (tmp_path / "out").exists()


def test_json_verify_report(ckpt, tmp_path):
    data = json_of(cli(ckpt, "-o", tmp_path / "out", "--verify", "--json"))
    assert data["outcome"] == "verified" and data["verify"]["problems"] == []
    assert data["verify"]["scales_replicated"] == 36


@pytest.mark.parametrize("args", [["--tp", "16"], ["--tp", "8", "--dry-run"], ["--block-size", "128"]],
                         ids=["tp-already-works", "tp-dry-run", "block-equals-source"])
def test_json_nothing_to_do_answer(tmp_path, args):
    data = json_of(cli(EXAMPLE, "-o", tmp_path / "out", "--json", *args))
    assert data["outcome"] == "nothing to do" and "nothing to convert" in data["reason"]
    assert not (tmp_path / "out").exists()


def test_json_error_is_an_object_besides_the_stderr_line(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    result = cli(ckpt, "-o", tmp_path / "out", "--json")
    line = one_error_line(result)
    data = json_of(result)
    assert data["exit_code"] == 1 and line == ERROR + data["error"]


@pytest.mark.parametrize("args", [["--block-size", "64x"], ["--no-such-option"]], ids=["malformed", "argparse"])
def test_json_usage_error_is_an_object_with_exit_2(ckpt, args):
    result = cli(ckpt, "--json", *args)
    assert result.returncode == 2
    assert json_of(result)["error"]


def test_json_in_place_and_restore(ckpt):
    data = json_of(cli(ckpt, "--in-place", "--json"))
    assert data["outcome"] == "converted in place" and data["summary"]["shards_written"] == 3
    data = json_of(cli(ckpt, "--restore", "--json"))
    assert data["outcome"] == "restored" and data["summary"]["shards_written"] == 3


def test_json_rerun_of_a_finished_in_place_conversion_says_already_complete(ckpt):
    cli(ckpt, "--in-place", "-q", check=True)
    result = cli(ckpt, "--in-place", "--json")
    data = json_of(result)
    assert data["outcome"] == "already complete" and data["summary"]["shards_kept"] == 3
    assert cli(ckpt, "--in-place", check=True).stdout.startswith(f"{ckpt}: already converted to 64x64")


def test_quiet_json_still_prints_the_object(ckpt, tmp_path):
    data = json_of(cli(ckpt, "-o", tmp_path / "out", "--json", "-q"))
    assert data["outcome"] == "converted"


@pytest.mark.parametrize("args, code", [
    (["--tp", "16"], 0),                                 # nothing to do: 128x128 loads at TP16
    (["--block-size", "128"], 0),                        # nothing to do
    (["--block-size", "64x"], 2), (["--block-size", "x64"], 2), (["--block-size", "0"], 2),
    (["--block-size", "-64"], 2), (["--block-size", "64x64x64"], 2),
    (["--tp", "8", "--block-size", "64"], 2),
    (["--in-place", "--workers", "4"], 2), (["--in-place", "--force"], 2),
    (["--dry-run", "--verify"], 2), (["--restore", "--force"], 2), (["--restore", "--workers", "2"], 2),
    (["--ep"], 2),
    (["--block-size", "48"], 1),                          # refused: does not divide 128
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_exit_code_policy(tmp_path, args, code):
    model = shutil.copytree(EXAMPLE, tmp_path / "model")
    before = snapshot(model)
    in_input = "--in-place" in args or "--restore" in args
    result = cli(model, *args) if in_input else cli(model, "-o", tmp_path / "out", *args)
    assert result.returncode == code, result.stderr
    if code:
        one_error_line(result)
    assert snapshot(model) == before and not (tmp_path / "out").exists()


def test_rerun_and_verify_mismatch_exit_codes(ckpt, tmp_path):
    out = tmp_path / "out"
    assert cli(ckpt, "-o", out, "-q").returncode == 0
    assert cli(ckpt, "-o", out, "-q").returncode == 0          # already complete: nothing to do
    flip_a_byte(out / "model-00002-of-00003.safetensors")
    assert cli(ckpt, "-o", out, "--verify", "-q").returncode == 1


def test_help_lists_the_exit_codes_and_does_not_claim_the_input_is_never_modified():
    text = cli("--help", check=True).stdout
    for code in ("0 ", "1 ", "2 ", "130 "):
        assert re.search(rf"^\s+{code}\s*\S", text, re.M), code
    assert "never modified" not in text
    assert "--in-place" in text and "org/name" in text


def test_readme_lists_the_same_exit_codes_as_help():
    help_codes = re.findall(r"^\s+(\d+)\s{2,}", cli("--help", check=True).stdout.split("exit codes")[1], re.M)
    readme = (ROOT / "README.md").read_text()
    readme_codes = re.findall(r"^\| (\d+) \|", readme, re.M)
    assert help_codes == readme_codes == ["0", "1", "2", "130"]


def test_dry_run_accepts_workers_and_says_so(ckpt, tmp_path):
    data = json_of(cli(ckpt, "-o", tmp_path / "out", "--dry-run", "--workers", "4", "--no-reflink", "--json"))
    assert data["workers"] == 4 and data["copy"] == "no-share"


# ---------------------------------------------------------------------------------------------
# 3. --dry-run tells the truth about the output folder (and --in-place state)
# ---------------------------------------------------------------------------------------------

def test_dry_run_on_a_finished_output_says_nothing_to_do(ckpt, tmp_path):
    cli(ckpt, "-o", tmp_path / "out", "-q", check=True)
    text = cli(ckpt, "-o", tmp_path / "out", "--dry-run", check=True).stdout
    assert "output now      already complete: nothing to do" in text
    data = json_of(cli(ckpt, "-o", tmp_path / "out", "--dry-run", "--json"))
    assert data["output_state"] == {"state": "complete", "shards_kept": 3, "bytes_to_write": 0}


def output_sizes(ckpt: Path, tmp_path: Path) -> dict[str, int]:
    """Sizes of every file of a complete conversion (the oracle for bytes still to write)."""
    ref = tmp_path / "reference"
    cli(ckpt, "-o", ref, "-q", check=True)
    return {p.relative_to(ref).as_posix(): p.stat().st_size for p in ref.rglob("*") if p.is_file()}


@pytest.fixture
def small_first(tmp_path: Path) -> Path:
    """A DeepSeek-V3 checkpoint whose first shard (embeddings, layer 0 attention) is the smallest,
    so a file-size limit lets the first shard finish and stops the run at the second."""
    def shard_of(name: str) -> int:
        if name.startswith(("model.embed_tokens", "model.layers.0.self_attn", "model.layers.0.input")):
            return 0
        return 1 if name.startswith(("model.layers.0.", "model.layers.1.")) else 2
    return tc.write_checkpoint(tmp_path / "DeepSeek-V3", tc.deepseek_v3_tensors(), tc.deepseek_v3_config(),
                               shards=3, shard_of=shard_of, extra_files=tc.default_extra_files())


def test_dry_run_after_an_interrupted_run_says_what_is_kept_and_left(small_first, tmp_path):
    ckpt = small_first
    sizes = output_sizes(ckpt, tmp_path)
    shards = sorted(n for n in sizes if n.endswith(".safetensors"))
    limit = sizes[shards[0]]                    # the first shard fits, a larger one does not
    assert sizes[shards[1]] > limit
    out = tmp_path / "out"
    interrupted_by_full_disk([ckpt, "-o", out, "-q", "--no-reflink"], limit)
    kept = sorted(s for s in shards if (out / s).exists())
    assert kept and len(kept) < len(shards)
    data = json_of(cli(ckpt, "-o", out, "--dry-run", "--json"))
    state = data["output_state"]
    assert state["state"] == "resume" and state["kept"] == kept
    assert state["bytes_to_write"] == sum(sizes.values()) - sum(sizes[s] for s in kept)
    text = cli(ckpt, "-o", out, "--dry-run", check=True).stdout
    assert f"resumable: {len(kept)} finished shards kept ({', '.join(kept)})" in text


def test_dry_run_on_a_foreign_folder_says_it_would_be_refused(ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    result = cli(ckpt, "-o", tmp_path / "out", "--dry-run", check=True)
    assert "output now      would be refused: " in result.stdout and "not empty" in result.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_dry_run_in_place_says_how_far_an_interrupted_in_place_run_got(small_first, tmp_path):
    ckpt = small_first
    sizes = output_sizes(ckpt, tmp_path)        # an in-place run writes the same shards
    new = json_of(cli(ckpt, "--in-place", "--dry-run", "--json"))["output_state"]
    assert new["state"] == "new" and new["kept"] == []
    first = sorted(n for n in sizes if n.endswith(".safetensors"))[0]
    interrupted_by_full_disk([ckpt, "--in-place", "-q", "--no-reflink"], sizes[first])
    state = json_of(cli(ckpt, "--in-place", "--dry-run", "--json"))["output_state"]
    assert state["state"] == "resume" and state["kept"] == [first]
    text = cli(ckpt, "--in-place", "--dry-run", check=True).stdout
    assert "input now       resumable: 1 finished shards kept" in text
    cli(ckpt, "--in-place", "-q", check=True)
    state = json_of(cli(ckpt, "--in-place", "--dry-run", "--json"))["output_state"]
    assert state["state"] == "complete"


# ---------------------------------------------------------------------------------------------
# 4. No dead ends
# ---------------------------------------------------------------------------------------------

def flip_a_byte(path: Path) -> None:
    """Damage a shard just after its header, in its first tensor."""
    data = bytearray(path.read_bytes())
    at = 8 + int.from_bytes(data[:8], "little") + 16
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_force_rewrites_a_damaged_output_of_the_same_conversion(ckpt, tmp_path):
    out, reference = tmp_path / "out", tmp_path / "reference"
    cli(ckpt, "-o", reference, "-q", check=True)
    cli(ckpt, "-o", out, "-q", check=True)
    flip_a_byte(out / "model-00001-of-00003.safetensors")
    verify = cli(ckpt, "-o", out, "--verify")
    assert verify.returncode == 1 and "--force" in verify.stderr.splitlines()[-1]
    rerun = one_error_line(cli(ckpt, "-o", out))
    assert "this conversion of this input" in rerun and "--force" in rerun
    cli(ckpt, "-o", out, "--force", "--verify", "-q", check=True)
    assert snapshot(out) == snapshot(reference)


@pytest.mark.parametrize("kind", ["someone-elses-files", "conversion-of-another-input"])
def test_force_never_touches_a_folder_of_someone_else(ckpt, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "someone-elses-files":
        out.mkdir()
        (out / "config.json").write_text("{}\n")
        (out / "model-00001-of-00003.safetensors").write_text("not a shard\n")
    else:                                       # same architecture, same names, other weights
        other = tc.write_checkpoint(tmp_path / "other", tc.deepseek_v3_tensors(seed=5), tc.deepseek_v3_config(),
                                    shards=3, extra_files=tc.default_extra_files())
        cli(other, "-o", out, "-q", check=True)
    before = snapshot(out)
    line = one_error_line(cli(ckpt, "-o", out, "--force"))
    assert "not empty" in line
    assert snapshot(out) == before


def test_block_size_larger_than_the_source_is_explained_as_such(ckpt, tmp_path):
    line = one_error_line(cli(ckpt, "-o", tmp_path / "out", "--block-size", "256"))
    assert "--block-size 256x256 is larger than the source block 128x128" in line
    assert "such as 64x64" in line and "lose information" not in line
    assert not (tmp_path / "out").exists()


def test_going_back_to_the_source_block_from_a_converted_output_still_works(ckpt, tmp_path):
    cli(ckpt, "-o", tmp_path / "b64", "-q", check=True)
    cli(tmp_path / "b64", "-o", tmp_path / "b128", "--block-size", "128", "-q", check=True)
    names = [p.name for p in ckpt.glob("*.safetensors")]
    assert all((tmp_path / "b128" / n).read_bytes() == (ckpt / n).read_bytes() for n in names)


def test_half_converted_in_place_folder_as_input_says_finish_or_restore(small_first, tmp_path):
    ckpt = small_first
    sizes = output_sizes(ckpt, tmp_path)
    interrupted_by_full_disk([ckpt, "--in-place", "-q", "--no-reflink"], sizes["model-00001-of-00003.safetensors"])
    for args in ([], ["--dry-run"], ["--verify"]):
        line = one_error_line(cli(ckpt, "-o", tmp_path / "out", *args))
        assert "half-way through an --in-place conversion to 64x64" in line
        assert "finish it with --in-place or undo it with --restore" in line
    assert not (tmp_path / "out").exists()


def test_finished_in_place_folder_is_an_ordinary_input(ckpt, tmp_path):
    cli(ckpt, "--in-place", "-q", check=True)
    cli(ckpt, "-o", tmp_path / "b32", "--block-size", "32", "-q", check=True)
    assert json.loads((tmp_path / "b32" / "config.json").read_text())["quantization_config"][
        "weight_block_size"] == [32, 32]


def chattr(path: Path, flag: str) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_permission_error_on_the_default_output_suggests_o(tmp_path):
    parent = tmp_path / "models"
    model = deepseek(parent / "DeepSeek-V3")
    if not chattr(parent, "+i"):                # root ignores mode bits; an immutable folder it cannot
        pytest.skip("chattr +i does not work on this filesystem")   # write in
    try:
        line = one_error_line(cli(model))
    finally:
        chattr(parent, "-i")
    assert "choose a writable folder with -o" in line
    assert sorted(p.name for p in parent.iterdir()) == ["DeepSeek-V3"]


def test_broken_pipe_ends_quietly_and_the_conversion_completes(ckpt, tmp_path):
    out = tmp_path / "out"
    proc = start(ckpt, "-o", out, via="script")
    proc.stdout.close()                         # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""
    converted(ckpt, out)


def test_pipe_into_head_prints_the_first_line_only(ckpt, tmp_path):
    cmd = f"set -o pipefail; {shlex.join(command(ckpt, '--dry-run', via='script'))} | head -1"
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("plan: ") and result.stdout.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# 5. The next step: how to serve the result
# ---------------------------------------------------------------------------------------------

def test_serving_hint_after_a_conversion_at_the_tp_the_block_allows(tmp_path):
    out = tmp_path / "tiny-Block64x64"
    text = cli(EXAMPLE, "-o", out, "--tp", "32", check=True).stdout
    assert f"python -m sglang.launch_server --model-path {out} --tp 32 --fp8-gemm-backend triton" in text
    assert f"SGLANG_ENABLE_JIT_DEEPGEMM=0 python -m sglang.launch_server --model-path {out} --tp 32\n" in text
    assert f"VLLM_USE_DEEP_GEMM=0 vllm serve {out} --tensor-parallel-size 32" in text


def test_serving_hint_without_tp_uses_the_largest_tp_the_block_loads(tmp_path):
    serve = json_of(cli(EXAMPLE, "-o", tmp_path / "b32", "--block-size", "32", "--json"))["serve"]
    assert serve["tp"] == 64 and serve["block"] == [32, 32] and "--tp 64" in serve["sglang"]


def test_serving_hint_is_in_dry_run_json_and_hidden_by_quiet(tmp_path):
    out = tmp_path / "out"
    serve = json_of(cli(EXAMPLE, "-o", out, "--dry-run", "--json"))["serve"]
    assert serve["tp"] == 32 and "--fp8-gemm-backend triton" in serve["sglang"]
    assert "VLLM_USE_DEEP_GEMM=0" in serve["vllm"]
    assert cli(EXAMPLE, "-o", out, "-q", check=True).stdout == ""


def test_serving_hint_with_ep_adds_expert_parallel_options(tmp_path):
    serve = json_of(cli(EXAMPLE, "-o", tmp_path / "out", "--tp", "32", "--ep", "--dry-run", "--json"))["serve"]
    assert "--ep-size 32" in serve["sglang"] and "--enable-expert-parallel" in serve["vllm"]


# ---------------------------------------------------------------------------------------------
# 6. A first run that shows the point: the README's quick start and the bundled example
# ---------------------------------------------------------------------------------------------

def readme_block_after(marker: str) -> list[str]:
    """The lines of the README code block that starts with `marker`."""
    text = (ROOT / "README.md").read_text()
    block = text.split(marker + "\n", 1)[1].split("```", 1)[0]
    return block.rstrip("\n").splitlines()


def test_readme_quick_start_is_two_commands_that_install_convert_and_test():
    lines = readme_block_after("## Try it (fresh clone, only Python and pip)\n\n```bash")
    assert len(lines) == 2
    first = [shlex.split(part) for part in lines[0].split("#")[0].split("&&")]
    assert first == [["pip", "install", "."], ["resize-block-size", "examples/tiny-deepseek-v3", "--tp", "32"]]
    assert lines[1].startswith("pip install torch==2.13.0 && pip install \".[test]\" && python -m pytest")


def test_quick_start_conversion_of_the_example_needs_64x64_for_tp32(tmp_path):
    out = tmp_path / "tiny-deepseek-v3-Block64x64"
    text = cli("examples/tiny-deepseek-v3", "--tp", "32", "-o", out, cwd=ROOT, check=True).stdout
    assert text.startswith("TP32 needs 64x64 blocks: model.layers.0.mlp.gate_proj.weight: 576 rows per rank")
    converted(EXAMPLE, out)


def test_example_needs_32x32_for_tp64(tmp_path):
    data = json_of(cli(EXAMPLE, "--tp", "64", "--dry-run", "--json"))
    assert data["target_block"] == [32, 32]
    assert data["tp"] == {"1": 128, "2": 128, "4": 128, "8": 128, "16": 128, "32": 64, "64": 32}


def test_readme_dry_run_of_the_example_is_the_real_output():
    shown = readme_block_after("$ resize-block-size examples/tiny-deepseek-v3 --dry-run")
    real = cli("examples/tiny-deepseek-v3", "--dry-run", cwd=ROOT, check=True).stdout
    real = real.replace(str(ROOT), "/path/to").rstrip("\n").splitlines()

    def stable(lines: list[str]) -> list[str]:
        return [line for line in lines if not line.startswith("  free space ")]
    assert stable(shown) == stable(real)
    assert any(line.startswith("  free space ") for line in real)


def test_example_stays_a_few_mb():
    size = sum(p.stat().st_size for p in EXAMPLE.rglob("*") if p.is_file())
    assert size < 10e6


def test_json_interrupted_run_is_an_object_with_exit_130(ckpt, tmp_path, monkeypatch):
    # A signal cannot be timed against a 0.1 s run from outside (test_safety does it on a big
    # checkpoint, in text mode); here the interrupt comes from inside the writer instead (the
    # forked run inherits the patch).
    import resize_block_size

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(resize_block_size, "write_files", interrupted)
    result = cli(ckpt, "-o", tmp_path / "out", "--json", via="fork")
    assert result.returncode == 130
    data = json.loads(result.stdout)
    assert data["exit_code"] == 130 and data["ok"] is False and "re-run the same command" in data["error"]
    assert result.stderr.startswith("resize-block-size: interrupted;")


def test_serving_hint_for_128x128_blocks_keeps_the_default_kernels(tmp_path):
    cli(EXAMPLE, "-o", tmp_path / "b64", "-q", check=True)
    serve = json_of(cli(tmp_path / "b64", "-o", tmp_path / "b128", "--block-size", "128", "--json"))["serve"]
    assert serve["block"] == [128, 128] and serve["tp"] == 16
    assert "triton" not in serve["sglang"] and "DEEP_GEMM" not in serve["vllm"] and "sglang_older" not in serve


def test_dry_run_in_place_on_a_changed_shard_says_it_would_be_refused(small_first, tmp_path):
    ckpt = small_first
    sizes = output_sizes(ckpt, tmp_path)
    interrupted_by_full_disk([ckpt, "--in-place", "-q", "--no-reflink"], sizes["model-00001-of-00003.safetensors"])
    shard = ckpt / "model-00003-of-00003.safetensors"      # not converted yet: replace it with another file
    tensors = load_file(shard)
    save_file(tensors, shard, metadata={"format": "pt", "edited": "yes"})
    data = json_of(cli(ckpt, "--in-place", "--dry-run", "--json"))
    assert data["output_state"]["state"] == "refused" and shard.name in data["output_state"]["reason"]
    assert "would be refused: " + shard.name in cli(ckpt, "--in-place", "--dry-run", check=True).stdout
    line = one_error_line(cli(ckpt, "--in-place"))     # and the real run does refuse it
    assert shard.name in line and "neither the original shard nor its converted version" in line


def test_summary_keeps_the_copy_method_apart_from_the_outcome(ckpt, tmp_path):
    methods = {"reflink", "direct", "copy_file_range", "buffered"}
    in_place = json_of(cli(ckpt, "--in-place", "--json"))["summary"]
    assert in_place["outcome"] == "converted in place" and in_place["method"] in methods
    restored = json_of(cli(ckpt, "--restore", "--json"))["summary"]
    assert restored["outcome"] == "restored" and restored["method"] in methods
    cli(ckpt, "-o", tmp_path / "out", "-q", check=True)
    again = json_of(cli(ckpt, "-o", tmp_path / "out", "--json"))["summary"]
    assert again["outcome"] == "already complete" and again["method"] == ""     # nothing was copied


def test_restore_on_a_snapshot_with_a_leftover_record_says_to_remove_it(cache):
    # What older versions left after refusing --in-place on a cache snapshot: a record, shards untouched.
    state = cache["snap_a"] / STATE
    (state / "original").mkdir(parents=True)
    (state / "run.json").write_text(json.dumps({"tool": "resize-block-size", "mode": "in-place"}))
    before = snapshot(cache["hub"])
    line = one_error_line(cli(cache["snap_a"], "--restore", env=hub_env(cache["hub"]), via="script"))
    assert "nothing was converted in place" in line and f"rm -r {state}" in line
    assert snapshot(cache["hub"]) == before
