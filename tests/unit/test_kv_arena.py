"""The KV arena: rows keep their tokens across a regrowth and a move, a released row reads
as zeros without touching its neighbours; the genai step LM with room reserved up front
never regrows during a chunked long prompt and decodes exactly as one that grows."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from serve.runtime.kv_arena import KVArena
from serve.runtime.loader import load_runtime
from tests.unit.variant_fixtures import build_lm_variants

DIMS = [(2, 8), (1, 16)]  # two layers' (kv heads, head size): 4 pages per row of 256 tokens


def _filled(rows: int, length: int) -> KVArena:
    arena = KVArena(DIMS, np.float32, rows, length)
    for i, buffer in enumerate(arena.buffers):
        buffer[...] = np.arange(buffer.size, dtype=np.float32).reshape(buffer.shape) + i
    return arena


def test_regrowth_keeps_each_rows_own_tokens_only():
    old = _filled(2, 256)
    lengths = np.array([5, 200])
    new = KVArena(DIMS, np.float32, 4, 512)
    new.copy_rows(old, lengths)
    for before, after in zip(old.buffers, new.buffers, strict=True):
        assert np.array_equal(after[0, :, :5], before[0, :, :5])
        assert np.array_equal(after[1, :, :200], before[1, :, :200])
        assert not after[0, :, 5:].any() and not after[2:].any()  # nothing else copied


def test_move_and_release_a_row():
    arena = _filled(3, 256)
    assert (2 * 256 * 8 * 4) % mmap.PAGESIZE == 0  # rows are whole pages here
    keep = [b[0].copy() for b in arena.buffers]
    last = [b[2, :, :100].copy() for b in arena.buffers]
    arena.move_row(2, 1, 100)
    arena.release(2)
    for buffer, row0, moved in zip(arena.buffers, keep, last, strict=True):
        assert np.array_equal(buffer[0], row0)  # a neighbour is untouched
        assert np.array_equal(buffer[1, :, :100], moved)
        assert not buffer[2].any()  # released pages read as zeros
    arena.release(1, start=128)  # a tail: whole pages of each head from token 128 on
    for buffer, moved in zip(arena.buffers, last, strict=True):
        assert np.array_equal(buffer[1, :, :100], moved) and not buffer[1, :, 128:].any()
        assert buffer[0].any()


@pytest.fixture(scope="module")
def genai(tiny, tmp_path_factory):
    out = build_lm_variants(tiny, tmp_path_factory.mktemp("arena-lm"), [
        "{name: genai-fp32, kind: export, format: onnx-genai, precision: fp32}"])
    return load_runtime(out / "genai-fp32")


def _greedy(lm, prompts: list[list[int]], long: list[int], chunk: int) -> list[list[int]]:
    """Short prompts decode while ``long`` prefills ``chunk`` tokens per step, then all
    decode together; every sequence's greedy tokens (the long one's after its prefill)."""
    out = [[int(lm.prefill(s, p).argmax())] for s, p in enumerate(prompts)]
    slot = len(prompts)
    for start in range(0, len(long), chunk):
        logits = lm.prefill(slot, long[start:start + chunk], start)
        rows = lm.decode(list(range(slot)), [o[-1] for o in out])
        for o, row in zip(out, rows, strict=True):
            o.append(int(row.argmax()))
    out.append([int(logits.argmax())])
    for _ in range(6):
        rows = lm.decode(list(range(slot + 1)), [o[-1] for o in out])
        for o, row in zip(out, rows, strict=True):
            o.append(int(row.argmax()))
    for s in range(slot + 1):
        lm.free(s)
    return out


def test_reserved_room_never_regrows_and_decodes_as_growing(genai):
    rng = np.random.default_rng(5)
    prompts = [[2, *rng.integers(4, 60, size=n).tolist()] for n in (4, 7, 3, 9, 5)]
    long = [2, *rng.integers(4, 60, size=95).tolist()]
    growing = genai.step_lm()
    before = growing.capacity
    want = _greedy(growing, prompts, long, 16)
    assert growing.capacity != before  # it had to grow (6 rows: the default room is 4)
    reserved = genai.step_lm()
    reserved.reserve(8, 128)
    assert reserved.capacity == (8, 128)
    assert _greedy(reserved, prompts, long, 16) == want
    assert reserved.capacity == (8, 128)  # no regrowth (no copy of the running rows)
