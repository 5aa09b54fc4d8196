"""Hub repo ids as --model_dir, against a hub cache laid out here (blobs + symlinked snapshots), offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
from click.testing import CliRunner
from conftest import MakeCheckpoint
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from moe_convert import convert, dry_run
from moe_convert.cli import main
from moe_convert.errors import CheckpointError, ConfigError, MoeConvertError, UsageError
from moe_convert.hub import resolve_model_dir

REPO = "acme/tiny-mixtral"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, files: list[Path], refs: tuple[str, ...] = ()) -> Path:
    """Lay out files the way huggingface_hub does: content in blobs/, relative symlinks in snapshots/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for f in files:
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob}")
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_checkpoint: MakeCheckpoint) -> Path:
    """HF_HOME in tmp, offline; REPO has main -> A (the default tiny model) and v2 -> B (seed 1)."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    add_snapshot(cache, REPO, COMMIT_A, sorted(make_checkpoint().iterdir()), refs=("main",))
    add_snapshot(cache, REPO, COMMIT_B, sorted(make_checkpoint(seed=1).iterdir()), refs=("v2",))
    # huggingface_hub reads these variables at import; in-process tests set its constants as well.
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def rank_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("rank*.safetensors"))}


def test_convert_from_hub_id_matches_local_and_records_the_commit(
    hub_cache: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    hub = convert(REPO, tmp_path / "hub", tp_size=2, moe_ep_size=2)
    local = convert(tiny_checkpoint, tmp_path / "local", tp_size=2, moe_ep_size=2)
    assert rank_bytes(hub.output_dir) == rank_bytes(local.output_dir)
    assert len(rank_bytes(hub.output_dir)) == 2
    source = json.loads((tmp_path / "hub" / "manifest.json").read_text())["source"]
    assert source["hub_id"] == REPO and source["revision"] == COMMIT_A
    assert Path(source["path"]) == hub_cache / "models--acme--tiny-mixtral" / "snapshots" / COMMIT_A
    assert [f["name"] for f in source["files"]] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert local.manifest["source"]["hub_id"] is None


@pytest.mark.parametrize("revision", ["v2", COMMIT_B])
def test_revision_picks_its_snapshot(
    hub_cache: Path, make_checkpoint: MakeCheckpoint, tmp_path: Path, revision: str
) -> None:
    result = convert(REPO, tmp_path / "hub", tp_size=2, revision=revision)
    other = convert(make_checkpoint(seed=1), tmp_path / "seed1", tp_size=2)
    main_rev = convert(REPO, tmp_path / "main", tp_size=2)
    assert result.manifest["source"]["revision"] == COMMIT_B
    assert rank_bytes(result.output_dir) == rank_bytes(other.output_dir)
    assert rank_bytes(result.output_dir) != rank_bytes(main_rev.output_dir)


def test_missing_id_offline_is_one_clean_error(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"acme/nope: not a local directory, and not in the hub cache .* HF_HUB_OFFLINE"
    ):
        convert("acme/nope", tmp_path / "out")
    result = CliRunner().invoke(main, ["convert", "--model_dir", "acme/nope", "--output_dir", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: acme/nope")
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    unknown_rev = CliRunner().invoke(
        main, ["convert", "--model_dir", REPO, "--revision", "v9", "--output_dir", str(tmp_path / "o")]
    )
    assert unknown_rev.exit_code == 1
    assert f"{REPO}@v9: not a local directory, and not in the hub cache" in unknown_rev.output


def test_local_path_wins_over_an_id_and_refuses_revision(
    hub_cache: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme").mkdir()
    (tmp_path / REPO).symlink_to(tiny_checkpoint, target_is_directory=True)
    resolved = resolve_model_dir(REPO)
    assert resolved.path == Path(REPO) and resolved.hub_id is None
    with pytest.raises(UsageError, match="--revision 'v2' applies to hub repo ids"):
        resolve_model_dir(REPO, "v2")


def test_symlinks_may_reach_the_repo_blobs_but_nothing_else(hub_cache: Path, tmp_path: Path) -> None:
    snapshot = hub_cache / "models--acme--tiny-mixtral" / "snapshots" / COMMIT_A
    assert resolve_model_dir(REPO).path == snapshot
    # The snapshot given by path (users point --model_dir into their cache) works as well.
    by_path = convert(snapshot, tmp_path / "by-path", tp_size=2)
    assert by_path.manifest["source"]["hub_id"] is None and len(by_path.ranks) == 2
    # A shard link escaping the repo's blobs (here into another repo's cache) is refused.
    other = add_snapshot(hub_cache, "evil/repo", COMMIT_A, [snapshot / "model-00002-of-00003.safetensors"])
    shard = snapshot / "model-00002-of-00003.safetensors"
    shard.unlink()
    shard.symlink_to(os.path.relpath((other / shard.name).resolve(), snapshot))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        convert(REPO, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_blobs_allowance_needs_the_hub_cache_shape(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A plain directory linking into a sibling `blobs/` is still outside its model directory."""
    model = tmp_path / "snapshots" / "x"
    model.mkdir(parents=True)
    (tmp_path / "blobs").mkdir()
    for f in tiny_checkpoint.iterdir():
        (tmp_path / "blobs" / f.name).write_bytes(f.read_bytes())
        (model / f.name).symlink_to(f"../../blobs/{f.name}")
    with pytest.raises(MoeConvertError, match="outside the model directory"):
        convert(model, tmp_path / "out")


def test_dry_run_of_a_hub_id_fetches_no_weights(
    hub_cache: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_snapshot(hub_cache, "acme/config-only", COMMIT_A, [tiny_checkpoint / "config.json"], refs=("main",))
    calls: list[list[str]] = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id: str, **kwargs: Any) -> str:
        calls.append(list(kwargs["allow_patterns"]))
        return str(real(repo_id, **kwargs))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    report = dry_run("acme/config-only", tp_size=2)
    assert report.ok and report.source.config_only
    assert report.document()["source"]["hub_id"] == "acme/config-only"
    assert report.document()["source"]["revision"] == COMMIT_A
    assert calls == [["config.json", "model.safetensors.index.json"]]
    # With the shards cached, the dry run reads their headers instead.
    assert not dry_run(REPO, tp_size=2).source.config_only


def test_online_download_asks_only_for_indexed_shards_at_the_resolved_commit(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No network: a stand-in for snapshot_download records what would be downloaded."""
    snapshot = tmp_path / "snap" / COMMIT_A
    snapshot.mkdir(parents=True)
    for f in tiny_checkpoint.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (snapshot / "consolidated.safetensors").write_bytes(b"stray copy that must not be downloaded")
    calls: list[tuple[str | None, list[str]]] = []

    def fake(repo_id: str, *, revision: str | None, allow_patterns: list[str], cache_dir: str | None) -> str:
        calls.append((revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolved = resolve_model_dir(REPO, "main")
    assert (resolved.hub_id, resolved.revision) == (REPO, COMMIT_A)
    assert calls[0] == ("main", ["config.json", "model.safetensors.index.json"])
    revision, patterns = calls[1]
    assert revision == COMMIT_A  # pinned: shards come from the commit the config came from
    assert sorted(patterns[2:]) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def _http(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/acme/x"))


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (GatedRepoError("gated", response=_http(403)), "is gated: accept its terms.*HF_TOKEN"),
        (
            RepositoryNotFoundError("404", response=_http(404)),
            r"no such repo on the hub \(or it is private\).*HF_TOKEN",
        ),
        (RevisionNotFoundError("404", response=_http(404)), "revision 'v7' not found on the hub; check --revision"),
    ],
)
def test_hub_errors_become_one_line_messages(monkeypatch: pytest.MonkeyPatch, error: Exception, message: str) -> None:
    def fake(*args: Any, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(ConfigError, match=message) as info:
        resolve_model_dir("acme/x", "v7")
    assert "\n" not in str(info.value)


def test_cli_honours_hf_home_and_offline_in_a_real_process(tiny_checkpoint: Path, tmp_path: Path) -> None:
    home = tmp_path / "hf-home"
    add_snapshot(home / "hub", REPO, COMMIT_A, sorted(tiny_checkpoint.iterdir()), refs=("main",))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    args = ["convert", "--model_dir", REPO, "--output_dir", str(out), "--tp_size", "2", "--json", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "moe_convert", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["source"]["hub_id"] == REPO and summary["source"]["revision"] == COMMIT_A
    assert [f["file"] for f in summary["files"]] == ["rank0.safetensors", "rank1.safetensors"]


# ---------------------------------------------------------------- a hub cache folder as --model_dir


def test_a_cache_folder_resolves_its_refs_main_snapshot(hub_cache: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`--model_dir ~/.cache/huggingface/hub/models--org--name` is what people paste: it works."""
    folder = hub_cache / "models--acme--tiny-mixtral"
    out = tmp_path / "out"
    args = ["convert", "--model_dir", str(folder), "--output_dir", str(out), "--tp_size", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"{folder} is the hub cache of {REPO}: using its snapshot {COMMIT_A[:12]} (main)" in result.stderr
    local = convert(tiny_checkpoint, tmp_path / "local", tp_size=2)
    assert rank_bytes(out) == rank_bytes(local.output_dir)
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert (source["hub_id"], source["revision"]) == (REPO, COMMIT_A)
    # --revision picks another ref (or a commit) of the folder.
    v2 = resolve_model_dir(str(folder), "v2")
    assert v2.path == folder / "snapshots" / COMMIT_B and v2.revision == COMMIT_B
    assert resolve_model_dir(str(folder), COMMIT_B).path == folder / "snapshots" / COMMIT_B
    assert dry_run(str(folder), tp_size=2).ok


@pytest.mark.parametrize("damage", ["no_ref", "garbage_ref", "ref_to_missing_snapshot", "ref_escapes"])
def test_a_cache_folder_without_a_usable_snapshot_says_what_to_pass(damage: str, hub_cache: Path) -> None:
    folder = hub_cache / "models--acme--tiny-mixtral"
    ref = folder / "refs" / "main"
    if damage == "no_ref":
        ref.unlink()
    elif damage == "garbage_ref":
        ref.write_text("../../../../etc")
    elif damage == "ref_to_missing_snapshot":
        ref.write_text("c" * 40)
    else:
        ref.unlink()
        ref.symlink_to(folder / "refs" / "v2")  # a link: not trusted
    result = CliRunner().invoke(main, ["plan", "--model_dir", str(folder)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert f"--model_dir {folder} is a Hugging Face cache folder" in lines[0]
    assert f"pass the hub id {REPO} (with HF_HUB_CACHE set to the folder above it)" in lines[0]
    assert "snapshots/<commit>" in lines[0] and f"(snapshots: {COMMIT_A[:12]} {COMMIT_B[:12]})" in lines[0]
    with pytest.raises(ConfigError):
        resolve_model_dir(str(folder), "../../escape")


def test_a_snapshot_whose_blobs_link_to_the_root_is_not_trusted(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Hub-cache-shaped, but `blobs` is a link to `/`: a shard link through it reaches any file, so the
    blobs allowance does not apply and the shard is refused as outside the model directory."""
    repo = tmp_path / "cache" / "models--evil--repo"
    snapshot = repo / "snapshots" / COMMIT_A
    snapshot.mkdir(parents=True)
    (repo / "blobs").symlink_to("/")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for f in tiny_checkpoint.iterdir():
        (outside / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs{outside / f.name}")
    with pytest.raises(MoeConvertError, match="outside the model directory"):
        convert(snapshot, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("revision", ["../../../../etc", "/etc/passwd", "main/../../x", "a\\b", ""])
def test_a_revision_that_is_a_path_is_refused(revision: str, hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a branch, tag or commit name"):
        resolve_model_dir(REPO, revision)
    result = CliRunner().invoke(
        main, ["convert", "--model_dir", REPO, "--revision", revision, "--output_dir", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and result.stderr.startswith("error: --revision") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_branch_names_with_slashes_are_revisions() -> None:
    from moe_convert.hub import _check_revision

    for ok in ("main", "v1.0", "refs/pr/1", "feature/x-y_z", COMMIT_A):
        _check_revision(ok)
