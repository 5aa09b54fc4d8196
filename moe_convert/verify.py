"""Verify a converted checkpoint against its manifest and, given the source, against every source byte.

Without a source: each rank file's safetensors header matches the manifest (names, dtypes, shapes, offsets),
its size and sha256 match, padding bytes are zero, tensors the manifest says are copies of the same source
bytes are identical across ranks, every expert x FFN slice is held exactly once per TP group, config.json
agrees with the manifest, and no stray rank or temporary file lies beside them.

With a source: additionally the manifest is compared with a fresh plan from the source and the manifest's
mapping and options (an edited manifest shows up here), config.json with the one the plan gives, and every
piece of every output tensor with the source box it was made from, cast to the output dtype.

Each byte is read once and memory stays bounded: rank files are read front to back in blocks (one sha256
for the file, one per piece), the source tensors the manifest uses are read once each, in file order and
in chunks, hashing each piece's expected bytes; the two passes run side by side and meet as digests.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import progress as progress_lines
from .errors import MoeConvertError, VerifyError, collect
from .execute import DEFAULT_CHUNK_BYTES
from .header import DTYPES, TensorInfo, itemsize, read_header
from .manifest import MANIFEST_FILE, build_manifest, read_manifest
from .mapping import Mapping
from .plan import Box, Piece
from .reading import SourceReader, chunk_boxes, intersect
from .source import SourceCheckpoint
from .units import count, human_bytes
from .writer import PARTIAL_SUFFIX

CONFIG_FILE = "config.json"
_BLOCK = 1024 * 1024  # read and hashed while still in the CPU cache
_RANK_FILE = re.compile(r"rank(\d+)\.safetensors")
_MAPPING_KEYS = ("world_size", "tp_size", "pp_size", "moe_tp_size", "moe_ep_size")

PieceKey = tuple[int, str, int]  # (index of the rank in the manifest, tensor name, piece index)


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found. `problems` is empty when the output is good."""

    output_dir: Path
    problems: tuple[str, ...]
    rank_files: int
    bytes_read: int  # rank file bytes
    source_bytes_read: int  # 0 without a source
    seconds: float
    with_source: bool

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        size = f"{count(self.rank_files, 'rank file')}, {human_bytes(self.bytes_read)}"
        if not self.ok:
            return f"{self.output_dir}: {count(len(self.problems), 'problem')} found ({size}, {self.seconds:.1f} s)"
        what = (
            f"every byte matches the source ({human_bytes(self.source_bytes_read)} read) and the manifest"
            if self.with_source
            else "headers, sizes and sha256 match the manifest"
        )
        return f"verified {self.output_dir}: {size}, {what} ({self.seconds:.1f} s)"


def verify(
    output_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str] | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
) -> VerifyReport:
    """Check a converted checkpoint; every problem found is reported, none raised.

    Args:
        output_dir: a moe-convert output (rank files, config.json, manifest.json).
        model_dir: the source checkpoint (a directory or a hub repo id); given, every output byte is
            compared with it.
        chunk_bytes: the most bytes of one source tensor held in memory at once.
        progress: show a progress bar on stderr (when it is a terminal).
    """
    started = time.perf_counter()
    out = Path(output_dir)
    v = _Verifier(out, chunk_bytes)
    try:
        v.run(model_dir, progress)
    finally:
        v.close_bar()
    return VerifyReport(
        output_dir=out,
        problems=tuple(v.problems),
        rank_files=v.rank_files,
        bytes_read=v.bytes_read,
        source_bytes_read=v.source_bytes_read,
        seconds=time.perf_counter() - started,
        with_source=model_dir is not None,
    )


def verify_or_raise(
    output_dir: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None = None, **kwargs: Any
) -> VerifyReport:
    """`verify`, raising VerifyError with every problem if there is any."""
    report = verify(output_dir, model_dir, **kwargs)
    collect(list(report.problems), VerifyError, f"{output_dir} failed verification")
    return report


# --------------------------------------------------------------------------------------------------
# The manifest, parsed defensively: an edited or damaged manifest must become problems, not tracebacks.


class _Bad(Exception):
    pass


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # data_offsets, relative to the first data byte
    end: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class _Rank:
    index: int  # position in the manifest's list
    rank: int
    coords: tuple[int, int, int, int]  # tp_rank, pp_rank, moe_tp_rank, moe_ep_rank
    file: str
    bytes: int
    sha256: str | None
    layers: tuple[int, ...]
    experts: tuple[int, ...]
    ffn_slice: tuple[int, int]
    tensors: tuple[_Tensor, ...]


def _int(v: object, what: str) -> int:
    if type(v) is not int or v < 0:
        raise _Bad(f"{what} is {_show(v)}, not a non-negative integer")
    return v


def _ints(v: object, what: str, n: int | None = None) -> tuple[int, ...]:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise _Bad(f"{what} is {_show(v)}, not a list of {n or 'some'} integers")
    return tuple(_int(x, what) for x in v)


def _pair(v: object, what: str) -> tuple[int, int]:
    a, b = _ints(v, what, 2)
    return a, b


def _parse_tensor(name: str, e: object) -> _Tensor:
    where = f"tensor {name!r}"
    if not isinstance(e, dict):
        raise _Bad(f"{where} is not an object")
    dtype = e.get("dtype")
    if dtype not in DTYPES:
        raise _Bad(f"{where}: dtype {_show(dtype)} is not a safetensors dtype")
    shape = _ints(e.get("shape"), f"{where}: shape")
    begin, end = _ints(e.get("data_offsets"), f"{where}: data_offsets", 2)
    pieces = []
    raw = e.get("pieces")
    if not isinstance(raw, list):
        raise _Bad(f"{where}: pieces is not a list")
    for i, p in enumerate(raw):
        if not isinstance(p, dict) or not isinstance(p.get("source"), str) or not isinstance(p.get("slice"), list):
            raise _Bad(f"{where}: pieces[{i}] needs a source name and a slice")
        box = tuple(_pair(d, f"{where}: pieces[{i}].slice") for d in p["slice"])
        pieces.append(Piece(p["source"], box, _int(p.get("dst_offset"), f"{where}: pieces[{i}].dst_offset")))
    return _Tensor(name, str(dtype), shape, begin, end, tuple(pieces))


def _parse_rank(index: int, e: object) -> _Rank:
    if not isinstance(e, dict):
        raise _Bad("not an object")
    file = e.get("file")
    if not isinstance(file, str) or not _RANK_FILE.fullmatch(file):
        raise _Bad(f"file {_show(file)} is not a rank file name like 'rank0.safetensors'")
    sha = e.get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise _Bad(f"sha256 is {_show(sha)}")
    tensors = e.get("tensors")
    if not isinstance(tensors, dict):
        raise _Bad("tensors is not an object")
    return _Rank(
        index=index,
        rank=_int(e.get("rank"), "rank"),
        coords=tuple(_int(e.get(k), k) for k in ("tp_rank", "pp_rank", "moe_tp_rank", "moe_ep_rank")),  # type: ignore[arg-type]
        file=file,
        bytes=_int(e.get("bytes"), "bytes"),
        sha256=sha,
        layers=_ints(e.get("layers"), "layers"),
        experts=_ints(e.get("experts"), "experts"),
        ffn_slice=_pair(e.get("ffn_slice"), "ffn_slice"),
        tensors=tuple(_parse_tensor(str(n), t) for n, t in tensors.items()),
    )


def _dict(v: object) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: object) -> list[Any]:
    return v if isinstance(v, list) else []


def _show(v: object, limit: int = 80) -> str:
    text = json.dumps(v, sort_keys=True) if isinstance(v, dict | list | str | int | float | None) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------


@dataclass
class _FileDigests:
    tensors: dict[str, str] = field(default_factory=dict)  # replicated tensors only
    pieces: dict[PieceKey, str] = field(default_factory=dict)


class _Verifier:
    def __init__(self, out: Path, chunk_bytes: int) -> None:
        self.out = out
        self.chunk_bytes = chunk_bytes
        self.problems: list[str] = []
        self.rank_files = 0
        self.bytes_read = 0
        self.source_bytes_read = 0
        self.bar: Any = None
        self.bar_lock = threading.Lock()

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def read_bytes(self, n: int, source: bool = False) -> None:
        with self.bar_lock:
            if source:
                self.source_bytes_read += n
            else:
                self.bytes_read += n
            if self.bar is not None:
                self.bar.update(n)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # -- the whole run --------------------------------------------------------------------------------

    def run(self, model_dir: str | os.PathLike[str] | None, progress: bool) -> None:
        if not self.out.is_dir():
            self.problem(f"{self.out}: not a directory; nothing to verify")
            return
        try:
            manifest = read_manifest(self.out)
        except VerifyError as e:
            self.problem(str(e))
            return
        ranks = self.parse_manifest(manifest)
        self.rank_files = len(ranks)
        config = self.read_config()
        self.check_structure(manifest, ranks, config)
        self.check_stray_files(ranks)
        source = None
        if model_dir is not None:
            from .convert import open_model

            try:
                source = open_model(model_dir)
            except MoeConvertError as e:
                self.problem(f"cannot open the source: {e}")
                return
            self.check_against_plan(manifest, config, source)
        work = self.source_work(ranks, source) if source is not None else {}
        if progress:
            rank_bytes = sum(r.bytes for r in ranks)
            source_bytes = sum(source.tensors[n].nbytes for n in work) if source else 0
            self.bar = progress_lines.start(
                "verifying",
                rank_bytes + source_bytes,
                enabled=True,
                headline=f"{count(len(ranks), 'rank file')}, {human_bytes(rank_bytes)} in {self.out}"
                + (f", against {human_bytes(source_bytes)} of the source" if source else ""),
            )
        replicated = _replicated_groups(ranks)
        expected: dict[PieceKey, str] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-verify-source") as pool:
            # The source pass and the rank-file pass run side by side (hashing and reads drop the GIL).
            source_pass = pool.submit(self.hash_source, source, work) if source is not None else None
            digests = {
                r.index: d
                for r in ranks
                if (d := self.check_rank_file(r, replicated.get(r.index, set()), source is not None)) is not None
            }
            if source_pass is not None:
                try:
                    expected = source_pass.result()
                except MoeConvertError as e:
                    self.problem(f"reading the source failed: {e}")
        self.compare_replicas(ranks, digests)
        if source is not None:
            self.compare_pieces(ranks, digests, expected)

    # -- manifest and config --------------------------------------------------------------------------

    def parse_manifest(self, manifest: dict[str, Any]) -> list[_Rank]:
        entries = manifest.get("ranks")
        if not isinstance(entries, list):
            self.problem(f"{MANIFEST_FILE}: 'ranks' is not a list")
            return []
        ranks = []
        for i, e in enumerate(entries):
            try:
                ranks.append(_parse_rank(i, e))
            except _Bad as bad:
                name = e.get("file") if isinstance(e, dict) else None
                self.problem(f"{MANIFEST_FILE}: ranks[{i}] ({name or 'no file'}): {bad}; this rank is not checked")
        return ranks

    def read_config(self) -> dict[str, Any] | None:
        path = self.out / CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.problem(f"{CONFIG_FILE}: missing; TensorRT-LLM cannot load the checkpoint without it")
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.problem(f"{CONFIG_FILE}: unreadable: {e}")
            return None
        if not isinstance(data, dict):
            self.problem(f"{CONFIG_FILE}: not a JSON object")
            return None
        return data

    def check_structure(self, manifest: dict[str, Any], ranks: list[_Rank], config: dict[str, Any] | None) -> None:
        """What the manifest and config.json say must hang together (needs no source)."""
        m = manifest.get("mapping")
        try:
            if not isinstance(m, dict):
                raise _Bad("is not an object")
            sizes = {k: _int(m.get(k), k) for k in _MAPPING_KEYS}
        except _Bad as bad:
            self.problem(f"{MANIFEST_FILE}: mapping {bad}")
            return
        mapping = Mapping(sizes["tp_size"], sizes["pp_size"], sizes["moe_tp_size"], sizes["moe_ep_size"])
        if min(sizes.values()) < 1 or mapping.moe_tp_size * mapping.moe_ep_size != mapping.tp_size:
            self.problem(f"{MANIFEST_FILE}: mapping {_show(m)} is impossible (moe_tp_size * moe_ep_size != tp_size)")
            return
        if sizes["world_size"] != mapping.world_size:
            self.problem(f"{MANIFEST_FILE}: mapping world_size {sizes['world_size']} != tp_size * pp_size")
        if config is not None:
            self.check_config_agrees(manifest, sizes, config)
        seen = Counter(r.rank for r in ranks)
        for rank in range(mapping.world_size):
            if seen[rank] == 0:
                self.problem(f"{MANIFEST_FILE}: no entry for rank {rank} (rank{rank}.safetensors)")
        for rank, n in sorted(seen.items()):
            if rank >= mapping.world_size:
                self.problem(f"{MANIFEST_FILE}: rank {rank} is outside the world of {mapping.world_size} ranks")
            elif n > 1:
                self.problem(f"{MANIFEST_FILE}: rank {rank} has {n} entries")
        total = manifest.get("total_bytes")
        if total != sum(r.bytes for r in ranks):
            self.problem(f"{MANIFEST_FILE}: total_bytes {_show(total)} != {sum(r.bytes for r in ranks)}, the sum")
        for r in ranks:
            if r.file != f"rank{r.rank}.safetensors":
                self.problem(f"{MANIFEST_FILE}: rank {r.rank}'s file is {r.file}, expected rank{r.rank}.safetensors")
            if r.rank < mapping.world_size:
                c = mapping.coords(r.rank)
                want = (c.tp_rank, c.pp_rank, c.moe_tp_rank, c.moe_ep_rank)
                if r.coords != want:
                    self.problem(
                        f"{r.file}: manifest coordinates (tp_rank, pp_rank, moe_tp_rank, moe_ep_rank) "
                        f"{r.coords} disagree with the mapping, which gives {want}"
                    )
            for t in r.tensors:
                self.check_tensor_entry(r, t)
        self.check_stages(ranks, config)
        self.check_experts(ranks, config)

    def check_config_agrees(self, manifest: dict[str, Any], sizes: dict[str, int], config: dict[str, Any]) -> None:
        cm = _dict(config.get("mapping"))
        for k in _MAPPING_KEYS:
            if cm.get(k) != sizes[k]:
                self.problem(f"{CONFIG_FILE}: mapping.{k} is {_show(cm.get(k))}, the manifest says {sizes[k]}")
        if config.get("dtype") != manifest.get("dtype"):
            self.problem(
                f"{CONFIG_FILE}: dtype is {_show(config.get('dtype'))}, "
                f"the manifest says {_show(manifest.get('dtype'))}"
            )
        options = _dict(manifest.get("options"))
        for k in ("use_parallel_embedding", "embedding_sharding_dim"):
            if config.get(k) != options.get(k):
                self.problem(f"{CONFIG_FILE}: {k} is {_show(config.get(k))}, the manifest says {_show(options.get(k))}")

    def check_tensor_entry(self, r: _Rank, t: _Tensor) -> None:
        """Offsets fit the dtype and shape; pieces lie inside the tensor and never overlap."""
        where = f"{r.file}: tensor {t.name!r}"
        if t.end - t.begin != t.nbytes:
            self.problem(
                f"{where}: manifest data_offsets [{t.begin}, {t.end}) hold {t.end - t.begin} bytes, "
                f"but {t.dtype} {list(t.shape)} needs {t.nbytes}"
            )
        item, covered = itemsize(t.dtype), 0
        for i, p in sorted(enumerate(t.pieces), key=lambda ip: ip[1].dst_offset):
            n = p.numel * item
            if any(b < a for a, b in p.box) or p.dst_offset % item:
                self.problem(f"{where}: manifest pieces[{i}] (from {p.source!r}) has a bad slice or offset")
            elif p.dst_offset < covered:
                self.problem(f"{where}: manifest pieces[{i}] (from {p.source!r}) overlaps the piece before it")
            elif p.dst_offset + n > t.nbytes:
                self.problem(
                    f"{where}: manifest pieces[{i}] (from {p.source!r}) ends past the tensor's {t.nbytes} bytes"
                )
            covered = max(covered, p.dst_offset + n)

    def check_stages(self, ranks: list[_Rank], config: dict[str, Any] | None) -> None:
        """A TP group (one pp stage) shares its layers; stages split the layers without gap or overlap."""
        stages: dict[int, dict[tuple[int, ...], list[str]]] = {}
        for r in ranks:
            stages.setdefault(r.coords[1], {}).setdefault(r.layers, []).append(r.file)
        owner: dict[int, int] = {}
        for stage, by_layers in sorted(stages.items()):
            if len(by_layers) > 1:
                desc = "; ".join(f"{', '.join(files)} hold {list(ls)}" for ls, files in by_layers.items())
                self.problem(f"pp stage {stage}: its ranks hold different layers: {desc}")
            for layers in by_layers:
                for layer in layers:
                    if owner.setdefault(layer, stage) != stage:
                        self.problem(f"layer {layer} is held by pp stages {owner[layer]} and {stage}")
        n = config.get("num_hidden_layers") if config else None
        expected = range(n) if isinstance(n, int) else range(max(owner, default=-1) + 1)
        missing = [layer for layer in expected if layer not in owner]
        if missing:
            self.problem(f"layers {missing} are held by no rank")

    def check_experts(self, ranks: list[_Rank], config: dict[str, Any] | None) -> None:
        """Per TP group, each expert's FFN rows [0, I) are split among its ranks exactly once."""
        moe = _dict(config.get("moe")) if config else {}
        n_experts = moe.get("num_experts") if isinstance(moe.get("num_experts"), int) else None
        # Each expert's FFN width: moe_intermediate_size where a family has both (Qwen), else intermediate_size.
        inter = (config.get("moe_intermediate_size") or config.get("intermediate_size")) if config else None
        if n_experts is None:
            n_experts = max((e + 1 for r in ranks for e in r.experts), default=0)
        if not isinstance(inter, int):
            inter = max((r.ffn_slice[1] for r in ranks), default=0)
        stages: dict[int, list[_Rank]] = {}
        for r in ranks:
            stages.setdefault(r.coords[1], []).append(r)
        for stage, members in sorted(stages.items()):
            # One line per fault, listing the experts it hits (a wrong ffn_slice hits them all).
            faults: dict[str, list[int]] = {}
            for e in range(n_experts):
                held = sorted((r.ffn_slice, r.file) for r in members if e in r.experts)
                covered, last = 0, ""
                for (a, b), file in held:
                    if a > covered:
                        faults.setdefault(f"FFN rows [{covered}, {a}) are held by no rank", []).append(e)
                    elif a < covered:
                        what = f"FFN rows [{a}, {min(b, covered)}) are held twice, by {last} and {file}"
                        faults.setdefault(what, []).append(e)
                    if b > covered:
                        covered, last = b, file
                if covered < inter:
                    faults.setdefault(f"FFN rows [{covered}, {inter}) are held by no rank", []).append(e)
            for what, experts in faults.items():
                which = f"expert {experts[0]}" if len(experts) == 1 else f"experts {', '.join(map(str, experts))}"
                self.problem(f"pp stage {stage}: {which}: {what}")

    def check_stray_files(self, ranks: list[_Rank]) -> None:
        listed = {r.file for r in ranks}
        for p in sorted(self.out.iterdir()):
            if p.name.endswith(PARTIAL_SUFFIX):
                self.problem(f"{p.name}: a temporary file of an interrupted run; resume the conversion or remove it")
            elif p.name.endswith(".safetensors") and p.name not in listed:
                self.problem(f"{p.name}: not in the manifest (left over from another conversion?); remove it")

    def check_against_plan(
        self, manifest: dict[str, Any], config: dict[str, Any] | None, source: SourceCheckpoint
    ) -> None:
        """Re-plan from the source with the manifest's mapping and options: the manifest must be that plan."""
        from .convert import plan_source, source_record
        from .trtllm_config import trtllm_config

        mapping = _dict(manifest.get("mapping"))
        options = _dict(manifest.get("options"))
        try:
            plan = plan_source(
                source,
                tp_size=mapping.get("tp_size", 1),
                pp_size=mapping.get("pp_size", 1),
                moe_tp_size=mapping.get("moe_tp_size"),
                moe_ep_size=mapping.get("moe_ep_size"),
                dtype=options.get("dtype", "auto"),
                use_parallel_embedding=bool(options.get("use_parallel_embedding", False)),
                embedding_sharding_dim=options.get("embedding_sharding_dim", 0),
                use_embedding_sharing=bool(options.get("use_embedding_sharing", False)),
            )
        except MoeConvertError as e:
            self.problem(f"cannot re-plan from the source with the manifest's mapping and options: {e}")
            return
        record = source_record(source)
        recorded = _dict(manifest.get("source")).get("files")
        if recorded != record["files"]:
            self.problem(
                f"{MANIFEST_FILE}: the source files recorded ({_show(recorded, 200)}) differ from "
                f"{source.model_dir}'s ({_show(record['files'], 200)}); is this the source it was converted from?"
            )
        expected = build_manifest(plan, record, None)
        for key in ("architecture", "expert_layout", "dtype", "options", "mapping", "total_bytes", "experts"):
            for path, a, b in _diff(manifest.get(key), expected[key], key):
                self.problem(f"{MANIFEST_FILE}: {path} is {_show(a)}, but the source and options give {_show(b)}")
        got = _list(manifest.get("ranks"))
        if len(got) != len(expected["ranks"]):
            self.problem(f"{MANIFEST_FILE}: {len(got)} ranks, but the source and options give {len(expected['ranks'])}")
        for want_rank, g in zip(expected["ranks"], got, strict=False):
            file = want_rank["file"]
            if not isinstance(g, dict):
                continue
            for key in want_rank:
                if key in ("sha256", "tensors"):
                    continue
                for path, a, b in _diff(g.get(key), want_rank[key], key):
                    self.problem(f"{file}: manifest {path} is {_show(a)}, but the source and options give {_show(b)}")
            tensors = _dict(g.get("tensors"))
            for name in want_rank["tensors"].keys() - tensors.keys():
                self.problem(f"{file}: tensor {name!r} is missing from the manifest")
            for name in tensors.keys() - want_rank["tensors"].keys():
                self.problem(f"{file}: tensor {name!r} is in the manifest but not in the plan")
            for name, want in want_rank["tensors"].items():
                if name in tensors:
                    for path, a, b in _diff(tensors[name], want, ""):
                        self.problem(
                            f"{file}: tensor {name!r}: manifest {path.lstrip('.')} is {_show(a)}, "
                            f"but the source and options give {_show(b)}"
                        )
        if config is not None:
            for path, a, b in _diff(config, trtllm_config(plan, source.settings), ""):
                self.problem(
                    f"{CONFIG_FILE}: {path.lstrip('.')} is {_show(a)}, but the source and options give {_show(b)}"
                )

    # -- rank files -----------------------------------------------------------------------------------

    def check_rank_file(self, r: _Rank, replicated: set[str], pieces: bool) -> _FileDigests | None:
        """Size, header, sha256, zero padding; digests of replicated tensors and of every piece."""
        path = self.out / r.file
        if not path.is_file():
            names = ", ".join(repr(t.name) for t in r.tensors[:3]) + (", ..." if len(r.tensors) > 3 else "")
            self.problem(f"{r.file}: missing; the manifest lists it with {len(r.tensors)} tensors ({names})")
            return None
        size = path.stat().st_size
        if size != r.bytes:
            self.problem(f"{r.file}: {size} bytes, but the manifest records {r.bytes} (truncated or replaced?)")
        try:
            header = read_header(path)
        except MoeConvertError as e:
            self.problem(f"{r.file}: {str(e).removeprefix(str(path) + ': ')}")
            return None
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        if not self.header_agrees(r, header, data_start=8 + n) or size != r.bytes:
            return None
        leaves = _leaves(r, 8 + n)
        want_tensors = {i for i, t in enumerate(r.tensors) if t.name in replicated}
        sha = hashlib.sha256()
        tensor_sha = {i: hashlib.sha256() for i in want_tensors}
        piece_sha: dict[tuple[int, int], Any] = {}
        nonzero: set[int] = set()
        buf = bytearray(_BLOCK)
        pos, li = 0, 0
        with open(path, "rb", buffering=0) as f:
            while got := f.readinto(buf):
                block, end = memoryview(buf)[:got], pos + got
                sha.update(block)
                while li < len(leaves) and leaves[li][0] < end:
                    start, stop, ti, pi = leaves[li]
                    part = block[max(start, pos) - pos : min(stop, end) - pos]
                    if ti in tensor_sha:
                        tensor_sha[ti].update(part)
                    if pi < 0:
                        if ti not in nonzero and bytes(part) != bytes(len(part)):
                            nonzero.add(ti)
                    elif pieces:
                        piece_sha.setdefault((ti, pi), hashlib.sha256()).update(part)
                    if stop > end:
                        break
                    li += 1
                pos = end
                self.read_bytes(got)
        if r.sha256 is None:
            self.problem(f"{r.file}: the manifest records no sha256 (a --dry_run manifest?)")
        elif sha.hexdigest() != r.sha256:
            self.problem(
                f"{r.file}: sha256 {sha.hexdigest()[:16]}... differs from the manifest's {r.sha256[:16]}...; "
                "the file was changed or damaged after conversion"
                + ("" if pieces else " (verify with --model_dir to find which tensor)")
            )
        for ti in sorted(nonzero):
            self.problem(f"{r.file}: tensor {r.tensors[ti].name!r}: padding bytes (covered by no piece) are not zero")
        return _FileDigests(
            tensors={r.tensors[i].name: h.hexdigest() for i, h in tensor_sha.items()},
            pieces={(r.index, r.tensors[ti].name, pi): h.hexdigest() for (ti, pi), h in piece_sha.items()},
        )

    def header_agrees(self, r: _Rank, header: dict[str, TensorInfo], data_start: int) -> bool:
        ok = True
        for t in r.tensors:
            info = header.get(t.name)
            if info is None:
                self.problem(f"{r.file}: tensor {t.name!r} is in the manifest but not in the file")
                ok = False
                continue
            got = (info.dtype, list(info.shape), [info.start - data_start, info.stop - data_start])
            want = (t.dtype, list(t.shape), [t.begin, t.end])
            for what, a, b in zip(("dtype", "shape", "data_offsets"), got, want, strict=True):
                if a != b:
                    self.problem(
                        f"{r.file}: tensor {t.name!r}: {what} is {_show(a)} in the file, {_show(b)} in the manifest"
                    )
                    ok = False
        for name in sorted(header.keys() - {t.name for t in r.tensors}):
            self.problem(f"{r.file}: tensor {name!r} is in the file but not in the manifest")
            ok = False
        return ok

    def compare_replicas(self, ranks: list[_Rank], digests: dict[int, _FileDigests]) -> None:
        """Tensors made of the same source pieces must be byte-identical on every rank that holds them."""
        for members in _replica_sets(ranks):
            found = [(r, digests[r.index].tensors[name]) for r, name in members if r.index in digests]
            if len(found) < 2:
                continue
            majority, _ = Counter(d for _, d in found).most_common(1)[0]
            reference = next(r.file for r, d in found if d == majority)
            for r, d in found:
                if d != majority:
                    self.problem(
                        f"{r.file}: tensor {members[0][1]!r} differs from its copy in {reference}; "
                        "both are made of the same source bytes and must be identical"
                    )

    # -- the source -----------------------------------------------------------------------------------

    def source_work(
        self, ranks: list[_Rank], source: SourceCheckpoint
    ) -> dict[str, list[tuple[PieceKey, Box, torch.dtype]]]:
        """Every piece to check, grouped by source tensor; pieces that cannot be read are problems."""
        work: dict[str, list[tuple[PieceKey, Box, torch.dtype]]] = {}
        for r in ranks:
            for t in r.tensors:
                for i, p in enumerate(t.pieces):
                    info = source.tensors.get(p.source)
                    where = f"{r.file}: tensor {t.name!r}: manifest pieces[{i}]"
                    if info is None:
                        self.problem(f"{where}: source tensor {p.source!r} is not in the source")
                    elif len(p.box) != len(info.shape) or any(
                        not 0 <= a <= b <= d for (a, b), d in zip(p.box, info.shape, strict=False)
                    ):
                        self.problem(
                            f"{where}: slice {_show([list(b) for b in p.box])} is outside "
                            f"{p.source!r} {list(info.shape)}"
                        )
                    else:
                        work.setdefault(p.source, []).append(((r.index, t.name, i), p.box, DTYPES[t.dtype]))
        for name, targets in work.items():
            shape = source.tensors[name].shape
            if not _covers(shape, [box for _, box, _ in targets]):
                self.problem(f"source tensor {name!r}: part of it is in no rank file")
        return work

    def hash_source(
        self, source: SourceCheckpoint, work: dict[str, list[tuple[PieceKey, Box, torch.dtype]]]
    ) -> dict[PieceKey, str]:
        """Each source tensor read once, in file order, chunk by chunk; each piece's expected bytes hashed."""
        order = sorted(work, key=lambda n: (str(source.tensors[n].file), source.tensors[n].start))
        reader = SourceReader(sorted({source.tensors[n].file for n in order}), self.chunk_bytes)
        hashes: dict[PieceKey, Any] = {}
        try:
            for name in order:
                info = source.tensors[name]
                for chunk in chunk_boxes(info.shape, info.torch_dtype.itemsize, self.chunk_bytes):
                    users = [
                        (key, sub, dt) for key, box, dt in work[name] if (sub := intersect(chunk, box)) is not None
                    ]
                    if not users:
                        continue
                    data = reader.read(info, chunk)
                    self.read_bytes(data.numel() * info.torch_dtype.itemsize, source=True)
                    for key, sub, dt in users:
                        local = tuple(slice(s - c0, e - c0) for (s, e), (c0, _) in zip(sub, chunk, strict=False))
                        piece = data[local].to(dt).contiguous()
                        hashes.setdefault(key, hashlib.sha256()).update(piece.reshape(-1).view(torch.uint8).numpy())
            reader.check_unchanged()
        finally:
            reader.close()
        return {key: h.hexdigest() for key, h in hashes.items()}

    def compare_pieces(
        self, ranks: list[_Rank], digests: dict[int, _FileDigests], expected: dict[PieceKey, str]
    ) -> None:
        for r in ranks:
            got = digests.get(r.index)
            if got is None:
                continue
            for t in r.tensors:
                item = itemsize(t.dtype)
                for i, p in enumerate(t.pieces):
                    key = (r.index, t.name, i)
                    if key not in expected or key not in got.pieces or got.pieces[key] == expected[key]:
                        continue
                    slice_text = ", ".join(f"{a}:{b}" for a, b in p.box)
                    self.problem(
                        f"{r.file}: tensor {t.name!r}: bytes [{p.dst_offset}, {p.dst_offset + p.numel * item}) "
                        f"of its data differ from source {p.source!r}[{slice_text}] as {t.dtype}"
                    )


def _leaves(r: _Rank, data_start: int) -> list[tuple[int, int, int, int]]:
    """The file's data as sorted runs (start, stop, tensor index, piece index or -1 for padding)."""
    leaves = []
    for ti, t in enumerate(r.tensors):
        base, cursor, item = data_start + t.begin, 0, itemsize(t.dtype)
        for pi, p in sorted(enumerate(t.pieces), key=lambda ip: ip[1].dst_offset):
            start = max(p.dst_offset, cursor)  # overlapping pieces were reported; never hash a byte twice
            stop = min(p.dst_offset + p.numel * item, t.nbytes)
            if start > cursor:
                leaves.append((base + cursor, base + start, ti, -1))
            if stop > start:
                leaves.append((base + start, base + stop, ti, pi))
            cursor = max(cursor, stop)
        if cursor < t.nbytes:
            leaves.append((base + cursor, base + t.nbytes, ti, -1))
    return sorted(leaves)


def _replica_sets(ranks: list[_Rank]) -> Iterator[list[tuple[_Rank, str]]]:
    """Groups of (rank, tensor name) made of exactly the same source pieces, dtype and shape."""
    groups: dict[tuple[Any, ...], list[tuple[_Rank, str]]] = {}
    for r in ranks:
        for t in r.tensors:
            if t.pieces:
                groups.setdefault((t.name, t.dtype, t.shape, t.pieces), []).append((r, t.name))
    for members in groups.values():
        if len(members) > 1:
            yield members


def _replicated_groups(ranks: list[_Rank]) -> dict[int, set[str]]:
    """Per rank index, the tensors whose bytes must be hashed to compare copies across ranks."""
    out: dict[int, set[str]] = {}
    for members in _replica_sets(ranks):
        for r, name in members:
            out.setdefault(r.index, set()).add(name)
    return out


def _covers(shape: tuple[int, ...], boxes: list[Box]) -> bool:
    """Whether the union of `boxes` is the whole tensor (on the grid of the boxes' own edges)."""
    if not shape or math.prod(shape) == 0:
        return True
    edges = [sorted({0, d, *(x for b in boxes for x in b[i])}) for i, d in enumerate(shape)]
    covered = torch.zeros([len(e) - 1 for e in edges], dtype=torch.bool)
    for b in boxes:
        covered[tuple(slice(e.index(lo), e.index(hi)) for e, (lo, hi) in zip(edges, b, strict=True))] = True
    return bool(covered.all())


def _diff(got: object, want: object, path: str) -> Iterator[tuple[str, object, object]]:
    """Leaf differences between two JSON values, as (path, got, want)."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in want:
            if k not in got:
                yield f"{path}.{k}", "(missing)", want[k]
            else:
                yield from _diff(got[k], want[k], f"{path}.{k}")
        for k in got.keys() - want.keys():
            yield f"{path}.{k}", got[k], "(nothing)"
    elif isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            yield from _diff(a, b, f"{path}[{i}]")
    elif type(got) is not type(want) or got != want:
        yield path, got, want
