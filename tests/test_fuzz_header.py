"""Property tests: random and mutated safetensors headers, index files and configs fed to the readers.

Properties, for every input:
- read_header / shard_files / open_source / spec_from_config_dict raise only the project's own errors;
- no file or directory outside the model dir is opened or listed (seen through Python's audit hooks, which
  report every open: builtins.open, io.open, os.open, listdir, scandir);
- the header reader never asks for more bytes than the file holds, so a hostile length cannot make it
  allocate (a 2**60 header length is rejected after reading 8 bytes);
- what is accepted is sane: every tensor's bytes lie inside the file, match dtype x shape, and do not overlap.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from moe_convert.errors import MoeConvertError
from moe_convert.example import TINY_CONFIG
from moe_convert.header import DTYPES, MAX_HEADER_BYTES, read_header
from moe_convert.source import INDEX_FILE, open_source, shard_files, spec_from_config_dict

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # seeded: the same examples on every run
    database=None,  # no .hypothesis directory in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CONFIG: dict[str, Any] = {
    **TINY_CONFIG,
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    "dtype": "float32",
}

VALID = save(
    {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.float16),
        "c": torch.zeros(1, 2, 2, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
    },
    metadata={"format": "pt"},
)


# ---------------------------------------------------------------- watching what the readers touch

_seen: list[tuple[str, str]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _seen is not None and event in ("open", "os.listdir", "os.scandir"):
        path = args[0] if args else None
        if isinstance(path, (str, bytes, os.PathLike)):
            _seen.append((event, os.fsdecode(path)))


sys.addaudithook(_audit)  # cannot be removed; costs nothing while _seen is None


@contextlib.contextmanager
def watch() -> Iterator[list[tuple[str, str]]]:
    """Record every path opened or listed inside the block."""
    global _seen
    _seen = seen = []
    try:
        yield seen
    finally:
        _seen = None


# Lazy imports (a codec looked up for the first time, say) open modules on sys.path at unpredictable moments.
_IMPORT_ROOTS = tuple({Path(p).resolve() for p in sys.path if p and Path(p).is_dir()} - {Path("/")})
_IMPORT_SUFFIXES = (".py", ".pyc", ".so")


def _is_import(event: str, path: Path) -> bool:
    in_roots = any(path.is_relative_to(r) for r in _IMPORT_ROOTS)
    return in_roots and (event != "open" or path.name.endswith(_IMPORT_SUFFIXES))


def assert_inside(seen: list[tuple[str, str]], root: Path) -> None:
    real_root = root.resolve()
    for event, raw in seen:
        path = Path(os.path.abspath(raw)).resolve()
        assert path.is_relative_to(real_root) or _is_import(event, path), f"{event} {raw} outside {root}"


@contextlib.contextmanager
def counting_reads() -> Iterator[list[int]]:
    """Record how many bytes every positioned read asks for (the readers read with os.pread only)."""
    reads: list[int] = []
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real(fd, n, offset)

    with mock.patch.object(os, "pread", pread):
        yield reads


def library_accepts(path: Path) -> bool:
    """Whether the safetensors library itself opens the file."""
    try:
        with safe_open(str(path), "pt"):
            return True
    except Exception:
        return False


# Dtypes the library reads whose elements are not whole bytes; we refuse them as unknown.
SUB_BYTE_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")


def read_header_checked(path: Path) -> dict[str, Any] | None:
    """read_header under every property; returns its result, or None when it raised a domain error.

    Accepts exactly what `safetensors.safe_open` accepts (sub-byte dtypes aside, which we cannot hold).
    """
    size = path.stat().st_size
    result = None
    with watch() as seen, counting_reads() as reads, contextlib.suppress(MoeConvertError):
        result = read_header(path)
    touched = {p for event, p in seen if not _is_import(event, Path(os.path.abspath(p)).resolve())}
    assert touched <= {str(path)}, seen
    # Never more than the file holds (the 8-byte length field aside).
    assert all(0 <= n <= max(8, size) for n in reads), (reads, size)
    assert sum(reads) <= max(8, size)
    if result is not None:
        _assert_sane(result, size)
    raw = path.read_bytes()
    if _has_duplicate_keys(raw):
        assert result is None  # the library keeps one copy; which one is ambiguous, so we refuse
    elif not any(f'"{d}"'.encode() in raw for d in SUB_BYTE_DTYPES):
        assert (result is not None) == library_accepts(path), f"we {'accept' if result is not None else 'refuse'}"
    return result


def _has_duplicate_keys(raw: bytes) -> bool:
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({k for k, _ in items}) != len(items)
        return dict(items)

    with contextlib.suppress(ValueError, RecursionError):
        json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")], object_pairs_hook=pairs)
    return found


def _assert_sane(tensors: dict[str, Any], size: int) -> None:
    spans = []
    for t in tensors.values():
        assert 8 <= t.start <= t.stop <= size
        assert t.stop - t.start == math.prod(t.shape) * DTYPES[t.dtype].itemsize
        if t.stop > t.start:
            spans.append((t.start, t.stop))
    spans.sort()
    for (_, stop), (start, _) in itertools.pairwise(spans):
        assert stop <= start, "overlapping tensors were accepted"


# ---------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
big_ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**53 + 1, 2**60, 2**63 - 1, 2**63, 2**64 - 1, 2**64]),
    st.integers(min_value=0, max_value=64),
)
dtype_codes = st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=6), json_values)
shapes = st.one_of(st.lists(big_ints, max_size=4), st.lists(st.integers(0, 8), max_size=3), json_values)
offsets = st.one_of(st.lists(big_ints, min_size=2, max_size=2), st.lists(big_ints, max_size=4), json_values)
entries = st.one_of(
    st.fixed_dictionaries({"dtype": dtype_codes, "shape": shapes, "data_offsets": offsets}),
    st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), json_values, max_size=4),
    json_values,
)
headers = st.one_of(
    st.dictionaries(st.one_of(st.text(max_size=8), st.just("__metadata__")), entries, max_size=5),
    json_values,
)


@st.composite
def built_files(draw: st.DrawFn) -> bytes:
    """A file from a generated header: sometimes with a wrong length field, always some data after it."""
    body = json.dumps(draw(headers)).encode()
    body += b" " * draw(st.integers(0, 8))
    length = draw(st.one_of(st.just(len(body)), big_ints.filter(lambda n: 0 <= n < 2**64)))
    return length.to_bytes(8, "little") + body + draw(st.binary(max_size=256))


@st.composite
def mutated_valid(draw: st.DrawFn) -> bytes:
    """The valid file with bytes flipped, cut short, or its length field replaced."""
    data = bytearray(VALID)
    kind = draw(st.sampled_from(["flip", "truncate", "length", "flip_header"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "length":
        n = draw(st.one_of(big_ints.filter(lambda n: 0 <= n < 2**64), st.integers(0, len(data))))
        data[:8] = n.to_bytes(8, "little")
        return bytes(data)
    header_len = int.from_bytes(VALID[:8], "little")
    top = 8 + header_len if kind == "flip_header" else len(data)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, top - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A fresh directory per example (hypothesis cannot use function-scoped pytest fixtures)."""
    with tempfile.TemporaryDirectory(prefix="moe-fuzz-") as d:
        yield Path(d)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- read_header


@FUZZ
@given(st.binary(max_size=1024))
def test_random_bytes(data: bytes) -> None:
    with scratch() as d:
        read_header_checked(_write(d / "x.safetensors", data))


@FUZZ
@given(mutated_valid())
def test_mutated_valid_files(data: bytes) -> None:
    with scratch() as d:
        read_header_checked(_write(d / "x.safetensors", data))


@FUZZ
@given(built_files())
def test_generated_headers(data: bytes) -> None:
    with scratch() as d:
        read_header_checked(_write(d / "x.safetensors", data))


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=6).filter(lambda s: s != "__metadata__"),
        st.tuples(
            st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8]),
            st.lists(st.integers(0, 4), max_size=3),
        ),
        max_size=5,
    )
)
def test_valid_files_agree_with_safetensors(spec: dict[str, tuple[torch.dtype, list[int]]]) -> None:
    """Whatever safetensors writes, we read back with the same names, dtypes and shapes."""
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}
    with scratch() as d:
        result = read_header_checked(_write(d / "x.safetensors", save(tensors)))
    assert result is not None
    assert {n: (DTYPES[t.dtype], list(t.shape)) for n, t in result.items()} == {
        n: (t.dtype, list(t.shape)) for n, t in tensors.items()
    }


@st.composite
def near_valid_files(draw: st.DrawFn) -> bytes:
    """A well-formed file (tensors back to back), often with one defect the library refuses, or not."""
    codes = ["F32", "F16", "BF16", "U8", "I64"]
    specs = draw(st.lists(st.tuples(st.sampled_from(codes), st.lists(st.integers(0, 3), max_size=3)), max_size=4))
    entries, offset = [], 0
    for k, (code, shape) in enumerate(specs):
        n = math.prod(shape) * DTYPES[code].itemsize
        entries.append((f"t{k}", {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}))
        offset += n
    defect = draw(st.sampled_from(["none", "gap", "trailing", "shift", "dup", "bom", "meta", "meta_null", "pad"]))
    if defect == "shift" and entries:
        _, e = entries[draw(st.integers(0, len(entries) - 1))]
        e["data_offsets"] = [e["data_offsets"][0] + 1, e["data_offsets"][1] + 1]
    if defect == "gap" and entries:
        for _, e in entries[draw(st.integers(0, len(entries) - 1)) :]:
            e["data_offsets"] = [e["data_offsets"][0] + 4, e["data_offsets"][1] + 4]
        offset += 4
    body = "{" + ",".join(f"{json.dumps(n)}:{json.dumps(e)}" for n, e in entries)
    if defect == "dup" and entries:
        name, e = entries[0]
        other = {**e, "shape": [*e["shape"], 1]} if draw(st.booleans()) else e
        body += ("," if entries else "") + f"{json.dumps(name)}:{json.dumps(other)}"
    if defect in ("meta", "meta_null"):
        meta = draw(st.sampled_from([{"format": "pt"}, {"a": 1}, [], "x"])) if defect == "meta" else None
        body += ("," if entries else "") + f'"__metadata__":{json.dumps(meta)}'
    raw = (body + "}").encode()
    if defect == "bom":
        raw = b"\xef\xbb\xbf" + raw
    raw += b" " * (-len(raw) % 8)
    data = bytes(offset + (draw(st.integers(1, 9)) if defect == "trailing" else 0))
    if defect == "pad":
        raw += b"\x00" * 8
    return len(raw).to_bytes(8, "little") + raw + data


@FUZZ
@given(near_valid_files())
def test_near_valid_files_agree_with_safetensors(data: bytes) -> None:
    with scratch() as d:
        read_header_checked(_write(d / "x.safetensors", data))


def _file(header: str | bytes, data: bytes = bytes(8)) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return len(raw).to_bytes(8, "little") + raw + data


_A = '"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}'
_A_X = '{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8],"x":'  # an extra field the library ignores
_GAP = '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}}'
STRICT_CASES = [
    ("valid", _file("{" + _A + "}"), True),
    ("metadata_null", _file('{"__metadata__":null,' + _A + "}"), True),
    ("metadata_strings", _file('{"__metadata__":{"format":"pt"},' + _A + "}"), True),
    ("extra_field", _file('{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8],"x":1}}'), True),
    ("trailing_spaces", _file("{" + _A + "}   "), True),
    (
        "nesting_127",
        _file('{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8],"x":' + "[" * 125 + "]" * 125 + "}}"),
        True,
    ),
    (
        "nesting_128",
        _file('{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8],"x":' + "[" * 126 + "]" * 126 + "}}"),
        False,
    ),
    ("duplicate_key", _file("{" + _A + ',"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}'), False),
    ("trailing_bytes", _file("{" + _A + "}", bytes(9)), False),
    (
        "gap",
        _file(
            '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}}'
        ),
        False,
    ),
    ("not_from_zero", _file('{"a":{"dtype":"U8","shape":[8],"data_offsets":[1,9]}}', bytes(9)), False),
    ("bom", _file(b"\xef\xbb\xbf{" + _A.encode() + b"}"), False),
    ("metadata_list", _file('{"__metadata__":[],' + _A + "}"), False),
    ("metadata_int_value", _file('{"__metadata__":{"x":1},' + _A + "}"), False),
    ("nan", _file('{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8],"x":NaN}}'), False),
    ("lone_surrogate", _file('{"a\\ud800":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}'), False),
    ("float_shape", _file('{"a":{"dtype":"U8","shape":[8.0],"data_offsets":[0,8]}}'), False),
    ("three_offsets", _file('{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8,8]}}'), False),
    ("missing_dtype", _file('{"a":{"shape":[8],"data_offsets":[0,8]}}'), False),
    ("overflow", _file('{"a":{"dtype":"U16","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', b""), False),
    (
        "u64_max_times_zero",
        _file('{"a":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', b""),
        True,
    ),
    ("nul_padding", _file("{" + _A + "}\x00\x00"), False),
    ("digits_5000", _file('{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,8]}}'), False),
]


@pytest.mark.parametrize(("data", "accepted"), [(d, a) for _, d, a in STRICT_CASES], ids=[c[0] for c in STRICT_CASES])
def test_strictness_matches_the_library(data: bytes, accepted: bool, tmp_path: Path) -> None:
    path = _write(tmp_path / "x.safetensors", data)
    assert library_accepts(path) == accepted
    assert (read_header_checked(path) is not None) == accepted


def test_identical_duplicate_keys_are_refused_though_the_library_takes_them(tmp_path: Path) -> None:
    """Which copy counts is ambiguous (json.loads keeps the last, serde the first): we refuse outright."""
    path = _write(tmp_path / "x.safetensors", _file("{" + _A + "," + _A + "}"))
    assert library_accepts(path)
    with pytest.raises(MoeConvertError, match="key 'a' appears twice"):
        read_header(path)


@pytest.mark.parametrize("length", [2**60, 2**64 - 1, MAX_HEADER_BYTES + 1])
def test_absurd_length_rejected_before_reading(length: int, tmp_path: Path) -> None:
    """The length is checked against the file size (and a 100 MB cap) before anything is allocated."""
    path = _write(tmp_path / "x.safetensors", length.to_bytes(8, "little") + b"{}")
    with counting_reads() as reads, pytest.raises(MoeConvertError, match=f"header length {length} bytes"):
        read_header(path)
    assert reads == [8]


def test_length_over_cap_in_a_big_enough_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write((MAX_HEADER_BYTES + 1).to_bytes(8, "little"))
        f.truncate(MAX_HEADER_BYTES + 64)  # sparse: no disk used
    with pytest.raises(MoeConvertError, match="byte limit"):
        read_header(path)


def test_deeply_nested_header(tmp_path: Path) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    path = _write(tmp_path / "x.safetensors", len(body).to_bytes(8, "little") + body)
    assert read_header_checked(path) is None


def test_overlap_hidden_behind_an_empty_tensor(tmp_path: Path) -> None:
    """A long tensor, an empty one inside it, and a short one inside it too: still an overlap."""
    header = {
        "long": {"dtype": "U8", "shape": [100], "data_offsets": [0, 100]},
        "empty": {"dtype": "U8", "shape": [0], "data_offsets": [50, 50]},
        "short": {"dtype": "U8", "shape": [20], "data_offsets": [60, 80]},
    }
    body = json.dumps(header).encode()
    path = _write(tmp_path / "x.safetensors", len(body).to_bytes(8, "little") + body + bytes(100))
    with pytest.raises(MoeConvertError, match="'long' and 'empty' overlap"):
        read_header(path)
    assert not library_accepts(path)


# ---------------------------------------------------------------- the index and the whole source

SHARD_NAMES = ["model-1.safetensors", "model-2.safetensors"]
hostile_paths = st.one_of(
    st.sampled_from(
        [
            *SHARD_NAMES,
            "link.safetensors",  # a symlink to a file outside the model dir
            "../outside.safetensors",
            "sub/../../outside.safetensors",
            "/etc/passwd",
            "//etc/passwd",
            "~/outside.safetensors",
            "./model-1.safetensors",
            "sub/model-1.safetensors",
            "",
            ".",
            "..",
            "x\x00y",
            "pytorch_model.bin",
            "fifo.safetensors",
            "dir.safetensors",
        ]
    ),
    st.text(max_size=12),
)
weight_maps = st.dictionaries(st.text(max_size=10), st.one_of(hostile_paths, json_values), max_size=6)
indexes = st.one_of(
    st.builds(lambda wm: {"metadata": {"total_size": 1}, "weight_map": wm}, weight_maps),
    st.builds(lambda wm: {"weight_map": wm}, st.dictionaries(st.text(max_size=10), hostile_paths, max_size=6)),
    json_values,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/outside.safetensors (valid: it must never be read) and root/model/ with traps beside the shards.

    Examples overwrite the index and the shards in place (the readers never write), which keeps a hundred
    examples to a second or two. Opening the source once first does the lazy imports, which read files
    outside the model dir that are no concern of the properties.
    """
    root = tmp_path_factory.mktemp("fuzz")
    _write(root / "outside.safetensors", VALID)
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(CONFIG))
    (model / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": SHARD_NAMES[0], "b": SHARD_NAMES[1]}}))
    for name in SHARD_NAMES:
        _write(model / name, VALID)
    (model / "link.safetensors").symlink_to(root / "outside.safetensors")
    (model / "dir.safetensors").mkdir()
    os.mkfifo(model / "fifo.safetensors")  # opening it for reading would hang the test
    (model / "sub").mkdir()
    with pytest.raises(MoeConvertError, match="in two files"):
        open_source(model)
    return model


def _fill(model: Path, index: bytes, shards: list[bytes] | None = None) -> None:
    (model / INDEX_FILE).write_bytes(index)
    for name, data in zip(SHARD_NAMES, shards or [VALID, VALID], strict=True):
        _write(model / name, data)


@FUZZ
@given(indexes)
def test_random_index_files(model: Path, index: Any) -> None:
    _fill(model, json.dumps(index).encode())
    with watch() as seen:
        try:
            files, _ = shard_files(model)
        except MoeConvertError:
            files = []
    assert_inside(seen, model)
    for f in files:
        assert f.resolve().is_relative_to(model.resolve()) and f.is_file()
        assert f.suffix == ".safetensors"


@FUZZ
@given(st.binary(max_size=256))
def test_random_index_bytes(model: Path, index: bytes) -> None:
    _fill(model, index)
    with watch() as seen, contextlib.suppress(MoeConvertError):
        shard_files(model)
    assert_inside(seen, model)


def test_index_with_a_huge_list(model: Path) -> None:
    _fill(model, b'{"weight_map": [' + b"0," * 500_000 + b"0]}")
    with pytest.raises(MoeConvertError, match="weight_map"):
        shard_files(model)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=6), st.sampled_from([*SHARD_NAMES, *SHARD_NAMES, "link.safetensors"]), max_size=8),
    st.lists(st.one_of(built_files(), mutated_valid(), st.just(VALID)), min_size=2, max_size=2),
)
def test_whole_source_with_fuzzed_shards(model: Path, weight_map: dict[str, str], shards: list[bytes]) -> None:
    _fill(model, json.dumps({"weight_map": weight_map}).encode(), shards)
    with watch() as seen:
        try:
            source = open_source(model)
        except MoeConvertError:
            source = None
    assert_inside(seen, model)
    if source is not None:
        for name, info in source.tensors.items():
            assert info.file.resolve().is_relative_to(model.resolve())
            if name in weight_map:
                assert info.file == model / weight_map[name]


# ---------------------------------------------------------------- config.json


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """The valid config with some values replaced by anything JSON, and some keys dropped or added."""
    cfg = dict(CONFIG)
    for key in draw(st.lists(st.sampled_from(sorted(CONFIG)), max_size=3)):
        cfg[key] = draw(json_values)
    for key in draw(st.lists(st.sampled_from(sorted(CONFIG)), max_size=2)):
        cfg.pop(key, None)
    cfg.update(
        draw(
            st.dictionaries(
                st.sampled_from(["head_dim", "rope_scaling", "torch_dtype", "id2label", "x"]), json_values, max_size=2
            )
        )
    )
    return cfg


@FUZZ
@given(mutated_configs())
def test_random_configs_raise_only_config_errors(cfg: dict[str, Any]) -> None:
    try:
        spec = spec_from_config_dict(cfg, "config.json")
    except MoeConvertError:
        return
    for v in (spec.hidden_size, spec.expert_ffn_size, spec.num_layers, spec.num_heads, spec.num_experts):
        assert isinstance(v, int) and v >= 1
    assert 1 <= spec.top_k <= spec.num_experts
