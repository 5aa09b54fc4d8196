"""Bad and hostile input: one line that names the file / tensor / option and the numbers, the right exit
code, no traceback, no output left behind, and the source directory never modified.

Most cases are table-driven through the CLI: each case breaks a private copy of the tiny checkpoint, runs
`moe-convert convert` in-process, and checks the error line, the output directory and a hash of the source.
"""

from __future__ import annotations

import builtins
import errno
import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from hostile import (
    PROGRESS_LINE,
    assert_error_line,
    no_final_outputs,
    private_copy,
    read_json,
    run_convert,
    tree_hash,
    write_json,
)
from safetensors.torch import load_file, save_file

from moe_convert import convert, execute
from moe_convert.cli import main
from moe_convert.errors import CheckpointError, ConfigError, MappingError
from moe_convert.source import INDEX_FILE, open_source

SHARD1 = "model-00001-of-00003.safetensors"
SHARD2 = "model-00002-of-00003.safetensors"
SHARD3 = "model-00003-of-00003.safetensors"
NORM = "model.norm.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"
W2_1_3 = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


# ---------------------------------------------------------------- helpers


@pytest.fixture
def src(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a case may break."""
    return private_copy(tiny_checkpoint, tmp_path / "model")


def assert_usage_error(result: Result, *fragments: str) -> str:
    """click's own usage errors: exit 2, the last stderr line names the option and the value."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    for f in fragments:
        assert f in last, f"{f!r} not in {last!r}"
    return last


def edit_config(model: Path, **changes: Any) -> None:
    """Set (or, with value ..., delete) keys of config.json."""
    cfg = read_json(model / "config.json")
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    write_json(model / "config.json", cfg)


def edit_index(model: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    index = read_json(model / INDEX_FILE)
    fn(index)
    write_json(model / INDEX_FILE, index)


def shard_of(model: Path, tensor: str) -> Path:
    return model / read_json(model / INDEX_FILE)["weight_map"][tensor]


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def write_raw(path: Path, header: Any, data: bytes, length: int | None = None) -> None:
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes((len(body) if length is None else length).to_bytes(8, "little") + body + data)


def edit_header(path: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    """Change a shard's JSON header in place, keeping its data bytes."""
    header, data = read_raw(path)
    fn(header)
    write_raw(path, header, data)


def edit_tensors(model: Path, fn: Callable[[dict[str, dict[str, torch.Tensor]]], Any], *, reindex: bool = True) -> None:
    """Rewrite the shards (shard name -> tensors) and, with `reindex`, the index to match them."""
    index = read_json(model / INDEX_FILE)
    shards = {name: load_file(model / name) for name in sorted(set(index["weight_map"].values()))}
    fn(shards)
    for name, tensors in shards.items():
        save_file(tensors, model / name, metadata={"format": "pt"})
    if reindex:
        index["weight_map"] = {t: name for name, ts in shards.items() for t in ts}
        write_json(model / INDEX_FILE, index)


def drop(*names: str) -> Callable[[dict[str, dict[str, torch.Tensor]]], None]:
    def fn(shards: dict[str, dict[str, torch.Tensor]]) -> None:
        for ts in shards.values():
            for n in names:
                ts.pop(n, None)

    return fn


def replace(name: str, value: torch.Tensor) -> Callable[[dict[str, dict[str, torch.Tensor]]], None]:
    def fn(shards: dict[str, dict[str, torch.Tensor]]) -> None:
        for ts in shards.values():
            if name in ts:
                ts[name] = value

    return fn


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """Break `model` (a private copy; `tmp` is its parent) and expect one error line from convert."""

    id: str
    setup: Callable[[Path, Path], Any]
    fragments: tuple[str, ...]  # may use {model} and {tmp}
    code: int = 1
    args: tuple[str, ...] = ()
    extra_checks: tuple[Callable[[Path, Path], None], ...] = field(default=())


def _swap_for_file(model: Path, tmp: Path) -> None:
    shutil.rmtree(model)
    model.write_text("not a directory")


def _not_mixtral(model: Path, tmp: Path) -> None:
    edit_config(model, architectures=["LlamaForCausalLM"], model_type="llama")


def _outside_copy(model: Path, tmp: Path) -> Path:
    """A valid shard outside the model dir: refusing it must not depend on it being broken."""
    outside = tmp / "outside.safetensors"
    shutil.copy(model / SHARD1, outside)
    return outside


def _index_points_at(value: Callable[[Path, Path], str]) -> Callable[[Path, Path], None]:
    def setup(model: Path, tmp: Path) -> None:
        target = value(model, tmp)
        edit_index(model, lambda ix: ix["weight_map"].__setitem__(NORM, target))

    return setup


def _symlinked_shard(model: Path, tmp: Path) -> None:
    outside = tmp / "elsewhere" / SHARD1
    outside.parent.mkdir()
    shutil.move(model / SHARD1, outside)
    (model / SHARD1).symlink_to(outside)


def _symlinked_config(model: Path, tmp: Path) -> None:
    shutil.move(model / "config.json", tmp / "secret.json")
    (model / "config.json").symlink_to(tmp / "secret.json")


def _truncate(name: str, size: int) -> Callable[[Path, Path], None]:
    def setup(model: Path, tmp: Path) -> None:
        path = model / name
        with open(path, "r+b") as f:
            f.truncate(size if size >= 0 else path.stat().st_size + size)

    return setup


def _length_field(name: str, value: int) -> Callable[[Path, Path], None]:
    def setup(model: Path, tmp: Path) -> None:
        with open(model / name, "r+b") as f:
            f.write(value.to_bytes(8, "little"))

    return setup


def _header_bytes(name: str, body: bytes) -> Callable[[Path, Path], None]:
    """Replace the header JSON with `body` (same length field semantics), keeping the data."""

    def setup(model: Path, tmp: Path) -> None:
        _, data = read_raw(model / name)
        (model / name).write_bytes(len(body).to_bytes(8, "little") + body + data)

    return setup


def _header_entry(tensor: str, **entry: Any) -> Callable[[Path, Path], None]:
    def setup(model: Path, tmp: Path) -> None:
        edit_header(shard_of(model, tensor), lambda h: h[tensor].update(entry))

    return setup


def _overlap(model: Path, tmp: Path) -> None:
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    assert shard_of(model, a) == shard_of(model, b)
    edit_header(shard_of(model, a), lambda h: h[b].__setitem__("data_offsets", h[a]["data_offsets"]))


def _offsets_past_end(model: Path, tmp: Path) -> None:
    def fn(h: dict[str, Any]) -> None:
        begin, end = h[NORM]["data_offsets"]
        h[NORM]["data_offsets"] = [begin + 10**6, end + 10**6]

    edit_header(shard_of(model, NORM), fn)


def _offsets_wrong_size(model: Path, tmp: Path) -> None:
    def fn(h: dict[str, Any]) -> None:
        begin, _ = h[NORM]["data_offsets"]
        h[NORM]["data_offsets"] = [begin, begin + 100]  # F32 [32] needs 128

    edit_header(shard_of(model, NORM), fn)


def _index_extra_name(model: Path, tmp: Path) -> None:
    edit_index(model, lambda ix: ix["weight_map"].__setitem__("model.ghost.weight", SHARD1))


def _index_wrong_shard(model: Path, tmp: Path) -> None:
    other = SHARD1 if shard_of(model, NORM).name != SHARD1 else SHARD2
    edit_index(model, lambda ix: ix["weight_map"].__setitem__(NORM, other))


def _same_tensor_twice(model: Path, tmp: Path) -> None:
    def fn(shards: dict[str, dict[str, torch.Tensor]]) -> None:
        home = next(n for n, ts in shards.items() if NORM in ts)
        other = next(n for n in shards if n != home)
        shards[other][NORM] = shards[home][NORM].clone()

    edit_tensors(model, fn)


def _pickles_only(model: Path, tmp: Path) -> None:
    for p in model.glob("*.safetensors*"):
        p.unlink()
    (model / "pytorch_model.bin").write_bytes(_evil_pickle(tmp))
    (model / "training_args.pt").write_bytes(_evil_pickle(tmp))


def _index_names_pickle(model: Path, tmp: Path) -> None:
    (model / "pytorch_model-00001-of-00001.bin").write_bytes(_evil_pickle(tmp))
    edit_index(model, lambda ix: ix["weight_map"].__setitem__(NORM, "pytorch_model-00001-of-00001.bin"))


class _Evil:
    """Unpickling this creates a marker file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (self.marker, "w"))


def _evil_pickle(tmp: Path) -> bytes:
    return pickle.dumps(_Evil(tmp / "UNPICKLED"))


def _never_unpickled(model: Path, tmp: Path) -> None:
    assert not (tmp / "UNPICKLED").exists()


def _deep_json(depth: int = 100_000) -> str:
    return '{"a": ' + "[" * depth + "]" * depth + "}"


CASES = [
    # --- model_dir and config.json
    Case("model_dir_missing", lambda m, t: shutil.rmtree(m), ("{model}", "does not exist")),
    Case("model_dir_is_a_file", _swap_for_file, ("{model}", "not a directory")),
    Case("no_config", lambda m, t: (m / "config.json").unlink(), ("{model}/config.json", "not found")),
    Case(
        "config_not_json", lambda m, t: (m / "config.json").write_text("{not json"), ("config.json", "not valid JSON")
    ),
    Case("config_not_utf8", lambda m, t: (m / "config.json").write_bytes(b"\xff\xfe\xfa"), ("config.json",)),
    Case("config_not_object", lambda m, t: (m / "config.json").write_text("[1, 2]"), ("config.json", "list")),
    Case("config_deeply_nested", lambda m, t: (m / "config.json").write_text(_deep_json()), ("config.json",)),
    Case(
        "config_symlink_outside",
        _symlinked_config,
        ("config.json", "outside the model directory"),
    ),
    Case(
        "not_mixtral",
        _not_mixtral,
        ("config.json", "unsupported architecture LlamaForCausalLM", "supported: MixtralForCausalLM"),
    ),
    Case(
        "no_architectures_unknown_model_type",
        lambda m, t: edit_config(m, architectures=..., model_type="llama"),
        ("model_type 'llama'", "supported: MixtralForCausalLM"),
    ),
    Case(
        "required_keys_missing",
        lambda m, t: edit_config(m, hidden_size=..., num_local_experts=...),
        ("config.json", "required keys missing", "hidden_size", "num_local_experts"),
    ),
    Case(
        "sizes_not_positive",
        lambda m, t: edit_config(m, hidden_size=0, num_attention_heads=-4),
        ("config.json", "positive integers", "hidden_size=0", "num_attention_heads=-4"),
    ),
    Case(
        "sizes_not_integers",
        lambda m, t: edit_config(m, intermediate_size=48.5, vocab_size="100", num_hidden_layers=True, hidden_size=None),
        ("intermediate_size=48.5", "vocab_size='100'", "num_hidden_layers=True", "hidden_size=None"),
    ),
    Case(
        "top_k_above_experts",
        lambda m, t: edit_config(m, num_experts_per_tok=9),
        ("config.json", "num_experts_per_tok 9", "num_local_experts 8"),
    ),
    Case(
        "transformers_rejects_field",
        lambda m, t: edit_config(m, rms_norm_eps="abc"),
        ("config.json", "rms_norm_eps", "'abc'"),
    ),
    # A key the conversion does not read (tests/test_settings.py: verify finds it) left to transformers,
    # because a setting is missing too (its default is transformers' to give).
    Case(
        "transformers_attribute_error",
        lambda m, t: edit_config(m, id2label=5, rms_norm_eps=...),
        ("config.json", "transformers"),
    ),
    Case(
        "rope_parameters_not_an_object",
        lambda m, t: edit_config(m, rope_parameters="abc"),
        ("config.json", "rope_parameters"),
    ),
    Case(
        "rope_theta_not_a_number",
        lambda m, t: edit_config(m, rope_parameters={"rope_type": "default", "rope_theta": "x"}),
        ("config.json", "rope_theta"),
    ),
    # --- the index
    Case("index_not_json", lambda m, t: (m / INDEX_FILE).write_text("{"), (INDEX_FILE, "not valid JSON")),
    Case("index_no_weight_map", lambda m, t: write_json(m / INDEX_FILE, {"metadata": {}}), (INDEX_FILE, "weight_map")),
    Case("index_is_a_list", lambda m, t: write_json(m / INDEX_FILE, []), (INDEX_FILE, "weight_map")),
    Case(
        "index_values_not_strings",
        lambda m, t: write_json(m / INDEX_FILE, {"weight_map": {NORM: 5}}),
        (INDEX_FILE, "weight_map"),
    ),
    Case(
        "index_weight_map_empty",
        lambda m, t: write_json(m / INDEX_FILE, {"weight_map": {}}),
        (INDEX_FILE, "weight_map", "empty"),
    ),
    Case("index_deeply_nested", lambda m, t: (m / INDEX_FILE).write_text(_deep_json()), (INDEX_FILE,)),
    Case("index_is_a_directory", lambda m, t: ((m / INDEX_FILE).unlink(), (m / INDEX_FILE).mkdir()), (INDEX_FILE,)),
    Case("shard_missing", lambda m, t: (m / SHARD2).unlink(), (INDEX_FILE, "missing", SHARD2)),
    Case(
        "shard_path_dotdot",
        _index_points_at(lambda m, t: f"../{_outside_copy(m, t).name}"),
        (INDEX_FILE, "'../outside.safetensors'", "outside the model directory"),
    ),
    Case(
        "shard_path_absolute",
        _index_points_at(lambda m, t: str(_outside_copy(m, t))),
        (INDEX_FILE, "{tmp}/outside.safetensors", "outside the model directory"),
    ),
    Case(
        "shard_path_nul_byte",
        _index_points_at(lambda m, t: "model\x00.safetensors"),
        (INDEX_FILE, "shard path"),
    ),
    Case("shard_symlink_outside", _symlinked_shard, (SHARD1, "resolves to {tmp}/elsewhere", "outside")),
    Case(
        "index_names_tensor_not_in_shard",
        _index_extra_name,
        (INDEX_FILE, "'model.ghost.weight'", SHARD1, "not in the named shard"),
    ),
    Case("index_names_wrong_shard", _index_wrong_shard, (INDEX_FILE, f"'{NORM}'", "not in the named shard")),
    Case("same_tensor_in_two_files", _same_tensor_twice, (f"'{NORM}'", "two files", SHARD1)),
    # --- safetensors files
    Case("shard_empty", _truncate(SHARD2, 0), (SHARD2, "0 bytes", "re-download")),
    Case("shard_truncated_in_header", _truncate(SHARD2, 100), (SHARD2, "header length", "100 bytes")),
    Case("shard_truncated_in_data", _truncate(SHARD2, -100), (SHARD2, "data ends at byte", "truncated")),
    Case("header_length_absurd", _length_field(SHARD2, 2**40), (SHARD2, "header length 1099511627776")),
    Case("header_length_max", _length_field(SHARD2, 2**64 - 1), (SHARD2, f"header length {2**64 - 1}")),
    Case("header_not_json", _header_bytes(SHARD2, b"x" * 64), (SHARD2, "header: not valid JSON")),
    Case("header_not_utf8", _header_bytes(SHARD2, b"\xff" * 64), (SHARD2, "header: not valid JSON")),
    Case("header_not_an_object", _header_bytes(SHARD2, b"[1, 2]  "), (SHARD2, "header is a list, expected an object")),
    Case("header_deeply_nested", _header_bytes(SHARD2, _deep_json().encode()), (SHARD2, "header")),
    Case("unknown_dtype", _header_entry(NORM, dtype="F7"), (f"'{NORM}'", "unknown dtype 'F7'")),
    Case("shape_negative", _header_entry(NORM, shape=[-32]), (f"'{NORM}'", "shape [-32]")),
    Case("shape_not_list", _header_entry(NORM, shape="32"), (f"'{NORM}'", "shape '32'")),
    Case("offsets_negative", _header_entry(NORM, data_offsets=[-128, 0]), (f"'{NORM}'", "data_offsets [-128, 0]")),
    Case("offsets_out_of_bounds", _offsets_past_end, (f"'{NORM}'", "data ends at byte", "the file has")),
    Case("offsets_not_dtype_x_shape", _offsets_wrong_size, (f"'{NORM}'", "hold 100 bytes", "needs 128")),
    Case(
        "offsets_overlap",
        _overlap,
        ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight", "overlap"),
    ),
    Case(
        "entry_not_object",
        lambda m, t: edit_header(shard_of(m, NORM), lambda h: h.__setitem__(NORM, [1])),
        (f"'{NORM}'", "not an object"),
    ),
    # --- tensors against config.json
    Case(
        "tensors_missing_all_listed",
        lambda m, t: edit_tensors(m, drop(NORM, W2_1_3, "lm_head.weight")),
        ("3 expected tensors are missing", NORM, W2_1_3, "lm_head.weight"),
    ),
    Case(
        "shapes_disagree_all_listed",
        lambda m, t: (edit_tensors(m, replace(NORM, torch.ones(33))), edit_tensors(m, replace(Q0, torch.ones(16, 32)))),
        ("2 tensors disagree with config.json", f"{NORM} is [33], config.json implies [32]", f"{Q0} is [16, 32]"),
    ),
    Case(
        "config_disagrees_with_every_expert",
        lambda m, t: edit_config(m, intermediate_size=64),
        ("72 tensors disagree with config.json", "is [48, 32], config.json implies [64, 32]"),
    ),
    Case(
        "unsupported_dtype",
        lambda m, t: edit_tensors(m, replace(NORM, torch.ones(32, dtype=torch.int32))),
        ("unsupported dtypes", f"{NORM} is I32"),
    ),
    Case(
        "all_tensor_problems_at_once",
        lambda m, t: (
            edit_tensors(m, drop(W2_1_3)),
            edit_tensors(m, replace(NORM, torch.ones(32, dtype=torch.int32))),
            edit_tensors(m, replace(Q0, torch.ones(16, 32))),
        ),
        ("(3 problems)", W2_1_3, f"{NORM} is I32", f"{Q0} is [16, 32]"),
    ),
    # --- pickles
    Case(
        "pickle_only",
        _pickles_only,
        ("{model}", "pytorch_model.bin", "training_args.pt", "safetensors is required"),
        extra_checks=(_never_unpickled,),
    ),
    Case(
        "index_names_a_pickle",
        _index_names_pickle,
        ("pytorch_model-00001-of-00001.bin", "safetensors is required"),
        extra_checks=(_never_unpickled,),
    ),
    # --- the mapping (usage errors: exit 2)
    Case("tp_zero", lambda m, t: None, ("--tp_size must be >= 1, got 0",), code=2, args=("--tp_size", "0")),
    Case("tp_negative", lambda m, t: None, ("--tp_size must be >= 1, got -2",), code=2, args=("--tp_size", "-2")),
    Case(
        "several_bad_sizes",
        lambda m, t: None,
        ("(3 problems)", "--pp_size must be >= 1, got 0", "--moe_tp_size must be >= 1 (or -1: not set), got -2"),
        code=2,
        args=("--pp_size", "0", "--moe_tp_size", "-2", "--moe_ep_size", "0"),
    ),
    Case(
        "moe_product_not_tp",
        lambda m, t: None,
        ("moe_tp_size * moe_ep_size must equal tp_size", "2 * 3 = 6", "--tp_size is 4"),
        code=2,
        args=("--tp_size", "4", "--moe_tp_size", "2", "--moe_ep_size", "3"),
    ),
    Case(
        "moe_ep_not_dividing_tp",
        lambda m, t: None,
        ("--moe_ep_size 3 does not divide --tp_size 4",),
        code=2,
        args=("--tp_size", "4", "--moe_ep_size", "3"),
    ),
    Case(
        "tp_does_not_fit_model",
        lambda m, t: None,
        (
            "(3 problems)",
            "intermediate_size 48 is not divisible by moe_tp_size 5",
            "num_attention_heads 4 is not divisible by tp_size 5",
            "tp_size 5 is not a multiple of num_key_value_heads 2",
        ),
        code=2,
        args=("--tp_size", "5"),
    ),
    Case(
        "experts_not_divisible_by_ep",
        lambda m, t: None,
        ("num_local_experts 8 is not divisible by moe_ep_size 3",),
        code=2,
        args=("--tp_size", "3", "--moe_ep_size", "3"),
    ),
    Case(
        "pp_above_layers",
        lambda m, t: None,
        ("pp_size 4 is larger than num_hidden_layers 3",),
        code=2,
        args=("--pp_size", "4"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(case: Case, src: Path, tmp_path: Path) -> None:
    case.setup(src, tmp_path)
    out = tmp_path / "out"
    before = tree_hash(src)
    result = run_convert(src, out, *case.args)
    fragments = [f.format(model=src, tmp=tmp_path) for f in case.fragments]
    assert_error_line(result, case.code, *fragments)
    assert not out.exists(), "the problem was knowable before writing; nothing may be created"
    assert tree_hash(src) == before
    for check in case.extra_checks:
        check(src, tmp_path)


# ---------------------------------------------------------------- click's usage errors (exit 2)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--tp_size", "1.5"), ("'--tp_size'", "'1.5'")),
        (("--tp_size", "abc"), ("'--tp_size'", "'abc'")),
        (("--moe_ep_size", "two"), ("'--moe_ep_size'", "'two'")),
        (("--dtype", "int8"), ("'--dtype'", "'int8'")),
        (("--embedding_sharding_dim", "2"), ("'--embedding_sharding_dim'", "2")),
        (("--workers", "0"), ("'--workers'", "0")),
    ],
    ids=["tp_float", "tp_text", "moe_ep_text", "dtype", "sharding_dim", "workers_zero"],
)
def test_option_type_errors_are_usage_errors(
    args: tuple[str, ...], fragments: tuple[str, ...], src: Path, tmp_path: Path
) -> None:
    before = tree_hash(src)
    result = run_convert(src, tmp_path / "out", *args)
    assert_usage_error(result, "Invalid value", *fragments)
    assert not (tmp_path / "out").exists()
    assert tree_hash(src) == before


def test_missing_model_dir_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", "--tp_size", "2"])
    assert_error_line(result, 2, "--model_dir is required")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the output directory


def test_output_not_empty_without_force(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before, before_out = tree_hash(src), tree_hash(out)
    result = run_convert(src, out)
    assert_error_line(result, 1, f"--output_dir {out}", "exists and is not empty", "--force")
    assert tree_hash(out) == before_out
    assert tree_hash(src) == before


def test_force_replaces_what_the_earlier_manifest_lists_and_nothing_else(src: Path, tmp_path: Path) -> None:
    """An earlier tp4 conversion, then --force tp2: rank2/rank3 (listed) go, look-alike names stay."""
    out = tmp_path / "out"
    assert run_convert(src, out, "--tp_size", "4", "--quiet").exit_code == 0
    others = {
        "notes.txt": "keep me",
        "ranking.safetensors.txt": "not ours: a glob rank*.safetensors* would take it",
        "rank0.safetensors.sha256": "not ours either",
    }
    for name, text in others.items():
        (out / name).write_text(text)
    before = tree_hash(src)
    result = run_convert(src, out, "--force", "--tp_size", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "manifest.json", "rank0.safetensors", "rank1.safetensors", *others]
    )
    assert all((out / name).read_text() == text for name, text in others.items())
    assert read_json(out / "manifest.json")["mapping"]["world_size"] == 2
    assert tree_hash(src) == before


def _files_of(out: Path) -> dict[str, Any]:
    return {p.name: (p.is_dir() or p.read_bytes()) for p in sorted(out.iterdir())}


@pytest.mark.parametrize(
    ("setup", "fragments"),
    [
        # A manifest that is not ours proves nothing: nothing is deleted, not even with --force.
        (lambda out: write_json(out / "manifest.json", {}), ("manifest.json", "not a moe-convert manifest")),
        (
            lambda out: write_json(out / "manifest.json", {"format": "moe-convert-manifest", "version": 2}),
            ("manifest.json", "ranks is null, not a list"),
        ),
        # Our names, but nothing lists them: refused, never overwritten.
        (lambda out: (out / "rank0.safetensors").mkdir(), ("holds rank0.safetensors", "no moe-convert manifest")),
        (lambda out: (out / "rank1.safetensors").write_text("x"), ("holds rank1.safetensors",)),
        (lambda out: (out / "rank1.safetensors.partial").write_text("x"), ("holds rank1.safetensors.partial",)),
    ],
    ids=["foreign_manifest", "malformed_manifest", "unlisted_dir", "unlisted_rank", "unlisted_partial"],
)
def test_force_never_touches_files_it_cannot_prove_it_wrote(
    setup: Callable[[Path], Any], fragments: tuple[str, ...], src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    setup(out)
    before, before_src = _files_of(out), tree_hash(src)
    result = run_convert(src, out, "--force", "--tp_size", "2")
    assert_error_line(result, 1, f"--output_dir {out}", *fragments)
    assert _files_of(out) == before
    assert tree_hash(src) == before_src


def test_force_refuses_a_directory_where_its_manifest_lists_a_file(src: Path, tmp_path: Path) -> None:
    """A directory under a name our manifest lists cannot be removed: one line, before anything is removed."""
    out = tmp_path / "out"
    assert run_convert(src, out, "--tp_size", "2", "--quiet").exit_code == 0
    (out / "rank1.safetensors").unlink()
    (out / "rank1.safetensors").mkdir()
    before = _files_of(out)
    result = run_convert(src, out, "--force", "--tp_size", "2")
    assert_error_line(result, 1, f"--output_dir {out}", "rank1.safetensors is a directory")
    assert _files_of(out) == before


def test_output_is_a_file(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    for extra in ((), ("--force",)):
        result = run_convert(src, out, *extra)
        assert_error_line(result, 1, f"--output_dir {out}", "is a file")
        assert out.read_text() == "a file"


def test_output_under_a_regular_file(src: Path, tmp_path: Path) -> None:
    """Not writable whatever the user (root included): a path whose parent is a file."""
    (tmp_path / "file").write_text("x")
    result = run_convert(src, tmp_path / "file" / "out")
    assert_error_line(result, 1, f"--output_dir {tmp_path}/file/out", "cannot create", "Not a directory")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; see the chattr test")
def test_output_not_writable_by_permissions(src: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        result = run_convert(src, ro / "out")
        assert_error_line(result, 1, f"{ro}/out", "Permission denied")
        result = run_convert(src, ro)
        assert_error_line(result, 1, f"--output_dir {ro}", "not writable")
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory nobody can write into, root included (chattr +i), or skip."""
    d = tmp_path / "immutable"
    d.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs ext4-like fs and CAP_LINUX_IMMUTABLE)")
    try:
        yield d
    finally:
        subprocess.run([chattr, "-i", str(d)], check=True)


def test_output_not_writable_even_for_root(src: Path, immutable_dir: Path) -> None:
    result = run_convert(src, immutable_dir)
    assert_error_line(result, 1, f"--output_dir {immutable_dir}", "not writable", "Operation not permitted")
    result = run_convert(src, immutable_dir / "out")
    assert_error_line(result, 1, f"--output_dir {immutable_dir}/out", "cannot create", "Operation not permitted")
    assert list(immutable_dir.iterdir()) == []


@pytest.mark.parametrize("where", ["same", "inside", "parent", "symlink"])
def test_output_overlapping_the_model_is_refused(where: str, src: Path, tmp_path: Path) -> None:
    out = {
        "same": src,
        "inside": src / "converted",
        "parent": tmp_path,  # the model dir inside the output: --force must not clear anything here
        "symlink": tmp_path / "link",
    }[where]
    if where == "symlink":
        out.symlink_to(src)
    before = tree_hash(src)
    result = run_convert(src, out, "--force")
    assert_error_line(result, 1, f"--output_dir {out}", f"overlaps --model_dir {src}")
    assert tree_hash(src) == before
    assert not (src / "converted").exists()


def test_not_enough_disk_space(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))  # type: ignore[attr-defined]
    out = tmp_path / "a" / "b" / "out"
    result = run_convert(src, out)
    assert_error_line(result, 1, f"--output_dir {out}", "only 1.00 KB is free", "free space")
    assert not (tmp_path / "a").exists(), "directories created for the output are removed again"


@pytest.mark.parametrize("call", ["pwrite", "fsync"])
def test_disk_full_while_writing(call: str, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from a data write, or from the flush at commit (delayed allocation reports it there)."""

    def full(*args: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, call, full)
    out = tmp_path / "out"
    before = tree_hash(src)
    result = run_convert(src, out, "--tp_size", "2")
    assert_error_line(result, 1, f"{out}/", "disk full", "No space left on device", "free space")
    assert no_final_outputs(out)
    assert tree_hash(src) == before


def test_cannot_write_rank_file(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission trouble at the first write (e.g. root_squash on NFS) is one line, nothing left behind."""
    real = os.open

    def refuse(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.path.basename(path).startswith("rank") and str(path).endswith(".partial"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    out = tmp_path / "out"
    result = run_convert(src, out)
    assert_error_line(result, 1, f"{out}/rank0.safetensors.partial", "Permission denied")
    assert no_final_outputs(out)


# ---------------------------------------------------------------- source changing under our feet


def _hook_first_read(monkeypatch: pytest.MonkeyPatch, action: Callable[[Path], None]) -> list[Path]:
    """Run `action(file)` on the source file of the executor's first read, then read as usual."""
    real = execute._SourceReader.read_bits
    hit: list[Path] = []

    def read(self: execute._SourceReader, info: Any, chunk: Any, into: Any = None) -> Any:
        if not hit:
            hit.append(info.file)
            action(info.file)
        return real(self, info, chunk, into)

    monkeypatch.setattr(execute._SourceReader, "read_bits", read)
    return hit


def test_source_truncated_while_converting(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def truncate(path: Path) -> None:
        os.truncate(path, path.stat().st_size // 2)

    hit = _hook_first_read(monkeypatch, truncate)
    out = tmp_path / "out"
    result = run_convert(src, out, "--tp_size", "2")
    assert hit
    line = assert_error_line(result, 1, str(hit[0]))
    assert "truncated or changed while converting" in line or "changed while converting" in line
    assert no_final_outputs(out)
    assert not any(out.glob("*.partial"))


def test_source_rewritten_in_place_while_converting(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same size, different bytes: caught by the file's mtime changing, before any rank file is committed."""

    def scribble(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(-64, os.SEEK_END)
            f.write(b"\x7f" * 64)

    hit = _hook_first_read(monkeypatch, scribble)
    out = tmp_path / "out"
    result = run_convert(src, out, "--workers", "2")
    assert hit
    assert_error_line(result, 1, str(hit[0]), "changed while converting", "rerun")
    assert no_final_outputs(out)
    assert not any(out.glob("*.partial"))


def test_source_deleted_while_converting(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard gone between planning and execution (e.g. a cache eviction)."""
    convert_module = importlib.import_module("moe_convert.convert")
    real = convert_module.check_space

    def prepare_then_delete(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        (src / SHARD2).unlink()

    monkeypatch.setattr(convert_module, "check_space", prepare_then_delete)
    out = tmp_path / "out"
    result = run_convert(src, out)
    assert_error_line(result, 1, SHARD2, "No such file")
    assert no_final_outputs(out)


def test_interrupt_is_exit_130_and_leaves_nothing(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(path: Path) -> None:
        raise KeyboardInterrupt

    _hook_first_read(monkeypatch, interrupt)
    out = tmp_path / "out"
    result = run_convert(src, out)
    assert result.exit_code == 130, result.output
    lines = [line for line in result.stderr.splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("interrupted")
    assert no_final_outputs(out)
    assert not any(out.glob("*.partial"))


# ---------------------------------------------------------------- things that are not errors


def test_stray_safetensors_is_never_read_and_mentioned_with_debug(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stray = src / "consolidated.safetensors"
    stray.write_bytes(b"\xff" * 64)  # garbage: reading its header would fail the run
    (src / "pytorch_model.bin").write_bytes(_evil_pickle(tmp_path))
    opened: list[str] = []
    real = os.open

    def recording(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording)
    before = tree_hash(src)
    result = run_convert(src, tmp_path / "out", "--debug")
    assert result.exit_code == 0, result.output
    assert f"ignoring {stray}: not listed in {INDEX_FILE}" in result.stderr
    assert not any(p.endswith(("consolidated.safetensors", ".bin")) for p in opened), opened
    assert not (tmp_path / "UNPICKLED").exists()
    assert tree_hash(src) == before
    quiet = run_convert(src, tmp_path / "out2")
    assert "consolidated" not in quiet.stderr


def test_unexpected_tensors_are_one_warning_line(src: Path, tmp_path: Path) -> None:
    edit_tensors(src, lambda shards: shards[SHARD1].update({"model.extra.bias": torch.ones(3)}))
    before = tree_hash(src)
    result = run_convert(src, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["1 unexpected tensors are ignored: model.extra.bias"]
    assert tree_hash(src) == before


def test_hostile_names_cannot_forge_log_lines(src: Path, tmp_path: Path) -> None:
    """A tensor name with a newline and a CI workflow command stays inside one escaped line."""
    evil = "x\n::error::owned\x1b[2J"
    edit_tensors(src, lambda shards: shards[SHARD1].update({evil: torch.ones(1)}))
    result = run_convert(src, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "\x1b" not in lines[0] and not lines[0].startswith("::")
    assert "\\n::error::owned" in lines[0]
    edit_config(src, architectures=["Evil\n::error::owned"])
    result = run_convert(src, tmp_path / "out2")
    assert_error_line(result, 1, "Evil\\n::error::owned")


# ---------------------------------------------------------------- --debug and the real process


def test_real_process_prints_one_line(tmp_path: Path) -> None:
    """The real interpreter: nothing else reaches stderr (no import-time warnings, no traceback)."""
    missing = tmp_path / "nope"
    args = [sys.executable, "-m", "moe_convert", "convert", "--model_dir", str(missing), "--output_dir", str(tmp_path)]
    plain = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    assert plain.stderr == f"error: {missing}: --model_dir does not exist\n"
    assert plain.stdout == ""


def test_debug_lets_the_traceback_through(tmp_path: Path) -> None:
    """With --debug the domain error propagates (the interpreter prints its traceback, exit 1)."""
    missing = tmp_path / "nope"
    result = run_convert(missing, tmp_path / "out", "--debug")
    assert isinstance(result.exception, ConfigError)
    assert result.exc_info is not None and result.exc_info[2] is not None
    assert "--model_dir does not exist" in str(result.exception)
    assert result.stderr == ""  # not swallowed into a line: the traceback is the interpreter's to print
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the library raises domain errors too


def test_library_raises_domain_errors(src: Path) -> None:
    """The API raises the same typed errors the CLI turns into lines."""
    cfg = read_json(src / "config.json")
    (src / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        open_source(src)
    write_json(src / "config.json", {**cfg, "num_experts_per_tok": None})
    with pytest.raises(ConfigError, match="num_experts_per_tok=None"):
        open_source(src)


def test_open_source_on_truncated_shard_raises_checkpoint_error(src: Path) -> None:
    os.truncate(src / SHARD3, 20)
    with pytest.raises(CheckpointError, match=SHARD3):
        open_source(src)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"tp_size": 1.5}, "--tp_size must be a whole number, got 1.5"),
        ({"tp_size": "2"}, "--tp_size must be a whole number, got '2'"),
        ({"pp_size": True}, "--pp_size must be a whole number, got True"),
        ({"moe_ep_size": 0}, "--moe_ep_size must be >= 1 (or -1: not set), got 0"),
    ],
)
def test_api_rejects_non_integer_sizes(kwargs: dict[str, Any], expected: str, src: Path, tmp_path: Path) -> None:
    """The Python API has no click to check types: the mapping does, with the same one-line messages."""
    with pytest.raises(MappingError) as e:
        convert(src, tmp_path / "out", **kwargs)
    assert str(e.value) == expected
    assert not (tmp_path / "out").exists()


def test_force_never_deletes_a_config_json_it_did_not_write(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--force replaces our own outputs; another model's config.json in the way is refused, untouched."""
    out = tmp_path / "someone-elses-model"
    out.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", out / "config.json")
    before = (out / "config.json").read_bytes()
    result = run_convert(tiny_checkpoint, out, "--force")
    line = assert_error_line(result, 1, str(out), "config.json that moe-convert did not write")
    assert "--force will not delete it" in line
    assert (out / "config.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
