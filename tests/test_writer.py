"""The streaming rank-file writer: whatever order bytes arrive in, the file and its sha256 are exact.

Tiny staging buffers (one page) make every test cross many buffer boundaries; both O_DIRECT and the
page-cache path are run, and byte ranges arrive in order, out of order (parked, then streamed in), as
buffers or copied from another file, with gaps that must read as zeros (vocab padding). The lanes
(write threads) are tested on their own and through whole conversions.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from moe_convert import execute
from moe_convert import writer as writer_module
from moe_convert.convert import convert
from moe_convert.errors import OutputError
from moe_convert.mapping import RankCoords
from moe_convert.plan import Piece, PlannedTensor, RankPlan
from moe_convert.writer import (
    ALIGN,
    RankFileWriter,
    WriteThreads,
    layout_rank_file,
    staging_buffer_bytes,
    staging_defaults,
)


def rank_plan(sizes: list[int], gaps: set[int]) -> RankPlan:
    """U8 tensors t0, t1, ... of the given sizes, each one piece except the tensors in `gaps` (all zero)."""
    tensors = []
    for i, n in enumerate(sizes):
        pieces = () if i in gaps else (Piece(f"src{i}", ((0, n),), 0),)
        tensors.append(PlannedTensor(f"t{i}", "U8", (n,), pieces))
    return RankPlan(RankCoords(0, 0, 0, 0, 0), "rank0.safetensors", (0,), (0,), (0, 1), tuple(tensors))


IO = ThreadPoolExecutor(4, thread_name_prefix="test-io")  # writes full staging buffers when depth > 1


def new_writer(path: Path, plan: RankPlan, direct: bool, lane: int = 0, depth: int = 1) -> RankFileWriter:
    return RankFileWriter(path, plan, lane, direct=direct, buffer_bytes=ALIGN, io=IO, depth=depth)


def expected_file(plan: RankPlan, data: dict[int, bytes]) -> bytes:
    layout = layout_rank_file(plan)
    return layout.header + b"".join(data.get(i, bytes(t.nbytes)) for i, t in enumerate(plan.tensors))


def write_all(
    w: RankFileWriter,
    plan: RankPlan,
    data: dict[int, bytes],
    order: list[int],
    source: Path | None = None,
    via_copy: frozenset[int] = frozenset(),
) -> None:
    """Write every tensor's bytes in `order`; those in `via_copy` are copied from `source` (at their offset
    in the expected file) instead of passed as buffers."""
    layout = layout_rank_file(plan)
    fd = os.open(source, os.O_RDONLY) if source else -1
    try:
        for i in order:
            offset = layout.offsets[f"t{i}"]
            if i in via_copy:
                assert w.copy_from(fd, offset, len(data[i]), offset) == len(data[i])
            else:
                w.write(offset, data[i])
    finally:
        if fd >= 0:
            os.close(fd)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * ALIGN + 5), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
    direct=st.booleans(),
    depth=st.sampled_from([1, 2, 3]),
)
def test_any_arrival_order_gives_the_exact_file_and_sha256(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], seed: int, direct: bool, depth: int
) -> None:
    """Also with several staging buffers per file, written by I/O threads while the next one fills."""
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("w")
    gaps = {i for i in range(len(sizes)) if rng.random() < 0.2}
    plan = rank_plan(sizes, gaps)
    data = {i: rng.randbytes(n) for i, n in enumerate(sizes) if i not in gaps}
    want = expected_file(plan, data)
    (tmp / "source").write_bytes(want)
    order = list(data)
    rng.shuffle(order)
    via_copy = frozenset(i for i in data if rng.random() < 0.5)

    w = new_writer(tmp / "rank0.safetensors", plan, direct, depth=depth)
    write_all(w, plan, data, order, tmp / "source", via_copy)
    sha = w.finish()

    assert (tmp / "rank0.safetensors").read_bytes() == want
    assert sha == hashlib.sha256(want).hexdigest()
    assert not (tmp / "rank0.safetensors.partial").exists()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_files_on_lanes_are_readable_by_safetensors(tmp_path: Path, direct: bool) -> None:
    """Six files on three lanes, each written by its lane in the order submitted."""
    rng = random.Random(0)
    sizes = [5 * ALIGN + 3, 17, 0, 2 * ALIGN, 999]
    plan = rank_plan(sizes, gaps={4})
    lanes = WriteThreads(3)
    shas: dict[int, str] = {}
    wants = []
    for k in range(6):
        data = {i: rng.randbytes(n) for i, n in enumerate(sizes) if i != 4}
        w = new_writer(tmp_path / f"rank{k}.safetensors", plan, direct, lane=k % 3)
        order = sorted(data, reverse=k % 2 == 1)  # odd files get everything back to front
        for i in order:
            lanes.submit(w.lane, functools.partial(w.write, layout_rank_file(plan).offsets[f"t{i}"], data[i]))
        lanes.submit(w.lane, functools.partial(lambda k, w: shas.__setitem__(k, w.finish()), k, w))
        wants.append((data, expected_file(plan, data)))
    lanes.close()
    for k, (data, want) in enumerate(wants):
        path = tmp_path / f"rank{k}.safetensors"
        assert path.read_bytes() == want and shas[k] == hashlib.sha256(want).hexdigest()
        with safe_open(str(path), "pt") as f:
            assert f.get_tensor("t0").numpy().tobytes() == data[0]
            assert torch.count_nonzero(f.get_tensor("t4")) == 0  # never written: zeros


def test_a_failing_lane_surfaces_in_the_caller_and_skips_the_rest() -> None:
    lanes = WriteThreads(2)
    ran: list[str] = []
    released: list[str] = []

    def boom() -> None:
        raise OutputError("disk full")

    lanes.submit(0, boom, lambda: released.append("boom"))
    with pytest.raises(OutputError, match="disk full"):
        for _ in range(1000):  # the error reaches the caller at its next submit
            lanes.submit(1, lambda: ran.append("x"), lambda: released.append("x"))
            time.sleep(0.001)
        lanes.close()
    lanes.close(cancel=True)
    assert "boom" in released and released.count("x") == len(released) - 1  # every release ran


def test_refused_direct_write_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems take O_DIRECT at open and refuse the write: the file is written all the same."""
    real = os.pwrite
    refused: list[int] = []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if os.O_DIRECT & writer_module.fcntl.fcntl(fd, writer_module.fcntl.F_GETFL):
            refused.append(fd)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    plan = rank_plan([3 * ALIGN + 1, 10], gaps=set())
    data = {0: os.urandom(3 * ALIGN + 1), 1: os.urandom(10)}
    w = new_writer(tmp_path / "rank0.safetensors", plan, direct=True)
    if not w.direct:
        pytest.skip("this file system refuses O_DIRECT at open already")
    write_all(w, plan, data, [0, 1])
    w.finish()
    assert refused and not w.direct
    assert (tmp_path / "rank0.safetensors").read_bytes() == expected_file(plan, data)


def test_bytes_written_twice_or_missing_are_a_bug_not_a_file(tmp_path: Path) -> None:
    plan = rank_plan([100, 100], gaps=set())
    offsets = layout_rank_file(plan).offsets
    w = new_writer(tmp_path / "a.safetensors", plan, direct=True)
    w.write(offsets["t1"], bytes(100))
    with pytest.raises(OutputError, match="written twice"):
        w.write(offsets["t1"], bytes(100))
    with pytest.raises(OutputError, match=r"only \d+ of \d+ bytes were written"):
        w.finish()
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_disk_full_while_writing_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    """With depth > 1 the write fails on an I/O thread: the lane raises it at its next wait or at finish."""

    def full(*args: Any) -> int:
        time.sleep(0.001)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    plan = rank_plan([20 * ALIGN], gaps=set())
    w = new_writer(tmp_path / "rank0.safetensors", plan, direct=True, depth=depth)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OutputError, match="disk full"):
        w.write(layout_rank_file(plan).offsets["t0"], bytes(20 * ALIGN))
        w.finish()
    w.abort()  # waits for the writes still in flight before closing the file
    assert list(tmp_path.iterdir()) == []


def test_writes_in_flight_finish_before_the_file_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """abort() after an error elsewhere: slow writes still in flight on I/O threads are waited for."""
    real, done = os.pwrite, []

    def slow(fd: int, data: Any, offset: int) -> int:
        time.sleep(0.05)
        n = real(fd, data, offset)  # EBADF here if the descriptor was closed under it
        done.append(offset)
        return n

    plan = rank_plan([6 * ALIGN], gaps=set())
    w = new_writer(tmp_path / "rank0.safetensors", plan, direct=False, depth=3)
    monkeypatch.setattr(os, "pwrite", slow)
    w.write(layout_rank_file(plan).offsets["t0"], bytes(3 * ALIGN))
    w.abort()
    assert len(done) == 3 and list(tmp_path.iterdir()) == []  # every write submitted had finished


@pytest.mark.parametrize("cpus", [2, 16])
def test_staging_memory_is_bounded(monkeypatch: pytest.MonkeyPatch, cpus: int) -> None:
    depth, largest = staging_defaults(cpus)
    monkeypatch.setattr(writer_module, "DEPTH", depth)
    monkeypatch.setattr(writer_module, "_MAX_BUFFER", largest)
    assert (depth, largest) == ((1, 2**20) if cpus == 2 else (2, 8 * 2**20))
    assert staging_buffer_bytes(8) == largest and staging_buffer_bytes(512) == 2**20 // (2 * depth)
    # A huge pp x tp run: buffers shrink, the total stays bounded.
    assert staging_buffer_bytes(4096) == 256 * 2**10 and 4096 * depth * staging_buffer_bytes(4096) <= depth * 2**30
    for n in (1, 8, 64, 256):
        assert n * depth * staging_buffer_bytes(n) <= 256 * 2**20


# ---------------------------------------------------------------- through the whole conversion


def rank_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.json"}


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_any_tensor_order_gives_the_same_rank_files(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """The order only decides speed: bytes ahead of a file's front are parked and streamed in later."""
    kwargs: dict[str, Any] = {"tp_size": 4, "moe_tp_size": 2, "moe_ep_size": 2, "dtype": "bfloat16"}
    convert(tiny_checkpoint, tmp_path / "usual", **kwargs)
    real = execute._write_order

    def other(*args: Any) -> list[str]:
        names = real(*args)
        return names[::-1] if order == "reversed" else random.Random(1).sample(names, len(names))

    monkeypatch.setattr(execute, "_write_order", other)
    convert(tiny_checkpoint, tmp_path / "other", **kwargs)
    assert rank_files(tmp_path / "other") == rank_files(tmp_path / "usual")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tp_size": 2, "pp_size": 3},
        {"tp_size": 4, "moe_tp_size": 2, "moe_ep_size": 2, "dtype": "bfloat16"},
        {"tp_size": 4, "use_parallel_embedding": True, "embedding_sharding_dim": 1},
    ],
    ids=["tp2_pp3", "tp4_moetp2_moeep2_bf16", "tp4_embedding_dim1"],
)
def test_direct_and_buffered_writes_give_identical_files(
    tiny_checkpoint: Path, tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    direct = convert(tiny_checkpoint, tmp_path / "direct", **kwargs)
    buffered = convert(tiny_checkpoint, tmp_path / "buffered", direct_io=False, **kwargs)
    assert rank_files(tmp_path / "direct") == rank_files(tmp_path / "buffered")
    assert [r.sha256 for r in direct.ranks] == [r.sha256 for r in buffered.ranks]


def test_tied_embeddings_across_stages(make_checkpoint: Any, tmp_path: Path) -> None:
    """With tied embeddings the embedding also feeds the last stage's lm_head, which sits at the end of its
    file: it arrives first, is parked, and must still land bit-exactly."""
    src = make_checkpoint(tie_word_embeddings=True)
    result = convert(src, tmp_path / "out", tp_size=2, pp_size=2)
    with safe_open(str(src / "model-00001-of-00003.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight") if "model.embed_tokens.weight" in f.keys() else None  # noqa: SIM118
    if embed is None:
        pytest.skip("the embedding is in another shard of this checkpoint")
    last = [r for r in result.ranks if r.file in ("rank2.safetensors", "rank3.safetensors")]
    assert last
    for r in last:
        with safe_open(str(tmp_path / "out" / r.file), "pt") as f:
            lm_head = f.get_tensor("lm_head.weight")
        tp_rank = int(r.file[4]) - 2
        rows = lm_head.shape[0]
        assert torch.equal(lm_head, embed[tp_rank * rows : (tp_rank + 1) * rows].to(lm_head.dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tiny_chunks_and_cast_blocks_give_the_same_files(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """Pieces cut from many chunks, each sliced and cast in many blocks by three lanes, land bit-exactly."""
    kwargs: dict[str, Any] = {"tp_size": 4, "moe_tp_size": 2, "moe_ep_size": 2, "dtype": dtype}
    convert(tiny_checkpoint, tmp_path / "usual", **kwargs)
    monkeypatch.setattr(execute, "CAST_BLOCK_BYTES", 96)
    threads = torch.get_num_threads()
    convert(tiny_checkpoint, tmp_path / "small", chunk_bytes=1000, workers=3, **kwargs)
    assert rank_files(tmp_path / "small") == rank_files(tmp_path / "usual")
    assert torch.get_num_threads() == threads  # casts ran on one torch thread each, then it was restored


@pytest.mark.parametrize("depth", [2, 3])
def test_staging_depth_gives_the_same_files(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    """Several page-sized staging buffers per file, written by I/O threads: the same bytes as one buffer."""
    kwargs: dict[str, Any] = {"tp_size": 4, "moe_tp_size": 2, "moe_ep_size": 2, "dtype": "bfloat16"}
    monkeypatch.setattr(writer_module, "DEPTH", 1)
    one = convert(tiny_checkpoint, tmp_path / "one", **kwargs)
    monkeypatch.setattr(writer_module, "DEPTH", depth)
    monkeypatch.setattr(writer_module, "_MAX_BUFFER", ALIGN)
    monkeypatch.setattr(writer_module, "_MIN_BUFFER", ALIGN)
    assert writer_module.io_thread_count(4) == 4 * (depth - 1)
    many = convert(tiny_checkpoint, tmp_path / "many", workers=3, **kwargs)
    assert rank_files(tmp_path / "many") == rank_files(tmp_path / "one")
    assert [r.sha256 for r in many.ranks] == [r.sha256 for r in one.ranks]
