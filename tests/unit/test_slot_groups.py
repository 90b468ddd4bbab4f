"""Decode groups of the torch and ONNX step LMs (:mod:`serve.runtime.slot_table`): one long
sequence decodes in a group of its own beside the short ones, every row's greedy tokens and
logits equal the sequence decoded alone, a join or leave re-lays out only the groups it
touches, and freeing (finish or preemption) leaves no slot allocated."""

from __future__ import annotations

import numpy as np
import pytest

from serve.runtime.loader import load_runtime
from serve.runtime.slot_table import partition
from tests.unit.test_step_lm import SCHEDULE, alone, artifact, interleaved

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

N = 12  # tokens generated per sequence
PASS = 16  # pass_tokens at the tiny model's scale (context 128)


def _cost(groups: list[list[int]], lengths: list[int], pass_tokens: int) -> int:
    return sum(pass_tokens + len(g) * max(lengths[i] for i in g) for g in groups)


def _set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1:]]


@pytest.mark.parametrize("lengths", [[3000, 100, 120, 90, 140, 80, 110, 95, 130],
                                     [5, 5, 5], [1, 2, 40, 41, 90, 300], [7]])
@pytest.mark.parametrize("pass_tokens", [0, 16, 2048])
def test_partition_is_optimal_and_sorted(lengths, pass_tokens):
    groups = partition(lengths, pass_tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)  # contiguous runs of the sorted lengths, shortest first
    if len(lengths) <= 6:  # against every way to split the set
        best = min(_cost(p, lengths, pass_tokens)
                   for p in _set_partitions(list(range(len(lengths)))))
        assert _cost(groups, lengths, pass_tokens) == best
    if len(lengths) == 9 and pass_tokens == 2048:  # the long prompt apart from 8 streams
        assert [len(g) for g in groups] == [8, 1] and groups[1] == [0]
    assert partition([], pass_tokens) == []


@pytest.fixture(scope="module")
def lms(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    return {fmt: load_runtime(artifact(tiny["llama"], root / fmt, fmt), device="cpu")
            for fmt in ("torch", "onnx")}


def _prompts(vocab: int, lengths: tuple[int, ...] = (5, 9, 7, 12, 90)) -> list[list[int]]:
    """Random prompts; by default four short ones and one long one (slot 4)."""
    rng = np.random.default_rng(3)
    return [[2, *rng.integers(4, vocab - 1, size=n - 1).tolist()] for n in lengths]


def _step(lm, seqs: dict[int, list[int]], logits: dict[int, list[np.ndarray]]) -> None:
    slots = list(seqs)
    rows = lm.decode(slots, [seqs[s][-1] for s in slots])
    for slot, row in zip(slots, rows, strict=True):
        seqs[slot].append(int(row.argmax()))
        logits[slot].append(row)


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_long_sequence_decodes_apart_and_equals_alone(lms, fmt):
    lm = lms[fmt].step_lm()
    lm.table.pass_tokens = PASS
    prompts = _prompts(lm.vocab_size)
    solo = {slot: alone(lm, p, N, slot) for slot, p in enumerate(prompts)}
    seqs: dict[int, list[int]] = {}
    logits: dict[int, list[np.ndarray]] = {}
    for slot in (4, 0, 1, 2):  # slot 3 joins later
        logits[slot] = [lm.prefill(slot, prompts[slot])]
        seqs[slot] = [int(logits[slot][0].argmax())]
    _step(lm, seqs, logits)
    # (a) the short rows form one group, the long one another, shortest group first
    assert [g.rows for g in lm.table.groups] == [[0, 2, 1], [4]]
    long_group = lm.table.groups[1]
    layout = lm.table.layout
    _step(lm, seqs, logits)
    assert lm.table.layout == layout  # a steady decode lays nothing out
    # (c) a short sequence joins: only the short group is laid out again
    logits[3] = [lm.prefill(3, prompts[3])]
    seqs[3] = [int(logits[3][0].argmax())]
    _step(lm, seqs, logits)
    short_group, again = lm.table.groups
    assert again is long_group and again.layout == long_group.layout
    assert sorted(short_group.rows) == [0, 1, 2, 3] and short_group.layout > layout
    while any(len(s) < N for s in seqs.values()):
        todo = {s: seq for s, seq in seqs.items() if len(seq) < N}
        _step(lm, todo, logits)
        for slot in [s for s, seq in seqs.items() if len(seq) >= N]:
            if slot in lm.table.lengths:
                lm.free(slot)
    # (b) every row's greedy tokens and logits are those of the sequence alone
    for slot, (want, want_logits) in solo.items():
        assert seqs[slot] == want, slot
        np.testing.assert_allclose(np.stack(logits[slot]), want_logits, atol=1e-5)
    assert lm.table.lengths == {} and lm.table.groups == ()


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_rows_do_not_depend_on_their_group(lms, fmt):
    """The same steps with every sequence in one batch and with decode groups: identical
    greedy tokens, logits within float rounding of the batch's matrix shapes."""
    runs = []
    for pass_tokens in (10**9, PASS):
        lm = lms[fmt].step_lm()
        lm.table.pass_tokens = pass_tokens
        prompts = _prompts(lm.vocab_size)
        seqs, logits = {}, {}
        for slot, prompt in enumerate(prompts):
            logits[slot] = [lm.prefill(slot, prompt)]
            seqs[slot] = [int(logits[slot][0].argmax())]
        for _ in range(N - 1):
            _step(lm, seqs, logits)
        assert len(lm.table.groups) == (1 if pass_tokens > PASS else 2)
        runs.append((seqs, {s: np.stack(rows) for s, rows in logits.items()}))
        for slot in seqs:
            lm.free(slot)
    (one_seqs, one_logits), (group_seqs, group_logits) = runs
    assert group_seqs == one_seqs
    for slot in one_logits:
        np.testing.assert_allclose(group_logits[slot], one_logits[slot], atol=1e-5)


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_free_and_preemption_release_every_slot(lms, fmt):
    lm = lms[fmt].step_lm()
    lm.table.pass_tokens = PASS
    prompts = _prompts(lm.vocab_size)
    want = alone(lm, prompts[1], N, 1)[0]
    seqs: dict[int, list[int]] = {}
    logits: dict[int, list[np.ndarray]] = {}
    for slot, prompt in enumerate(prompts):
        logits[slot] = [lm.prefill(slot, prompt)]
        seqs[slot] = [int(logits[slot][0].argmax())]
    _step(lm, seqs, logits)
    assert len(lm.table.groups) == 2
    # preempt the long sequence (freed mid-decode, to be recomputed): its group goes at once
    lm.free(4)
    del seqs[4]
    assert [sorted(g.rows) for g in lm.table.groups] == [[0, 1, 2, 3]]
    # a subset step leaves slot 3 out: it keeps a cache of its own; then it is freed unstepped
    _step(lm, {s: seqs[s] for s in (0, 1, 2)}, logits)
    lm.free(3)
    with pytest.raises(ValueError, match="no cache"):
        lm.decode([3], [1])
    # a prefilled slot that never decoded is freed too; the others go on undisturbed
    lm.prefill(4, prompts[4])
    lm.free(4)
    while len(seqs[1]) < N:
        _step(lm, {s: seqs[s] for s in (0, 1, 2)}, logits)
    assert seqs[1] == want
    for slot in (0, 1, 2):
        lm.free(slot)
    assert lm.table.lengths == {} and lm.table.groups == ()


def _counting(lm) -> list[int]:
    """The number of decode groups after each of ``lm``'s decode steps, from now on."""
    counts: list[int] = []
    decode = lm.decode

    def counted(slots, tokens):
        out = decode(slots, tokens)
        counts.append(len(lm.table.groups))
        return out

    lm.decode = counted
    return counts


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_schedule_with_groups_equals_alone(lms, fmt):
    """test_step_lm's join/leave/subset schedule, with groups forming at the tiny scale."""
    lm = lms[fmt].step_lm()
    lm.table.pass_tokens = 4
    prompts = _prompts(lm.vocab_size, (60, 9, 30, 7, 5, 12))
    solo = [alone(lm, p, n) for p, (_, _, n) in zip(prompts, SCHEDULE, strict=True)]
    counts = _counting(lm)
    got, logits = interleaved(lm, prompts)
    assert max(counts) >= 3  # several groups really ran side by side
    for i, (_, _, n) in enumerate(SCHEDULE):
        assert got[i] == solo[i][0][:n], i
        np.testing.assert_allclose(logits[i], solo[i][1][:n], atol=1e-5)
    assert lm.table.lengths == {} and lm.table.groups == ()


@pytest.mark.parametrize("arch", ["gemma3", "qwen3_5"])
def test_groups_with_sliding_windows_and_linear_states(arch, tmp_path):
    """Sliding-window masks per group (Gemma 3) and linear-attention states slotted per
    group (Qwen3.5): the join/leave/subset schedule in several groups equals alone."""
    from transformers import AutoModelForCausalLM

    from compress.tiny_archs import build_decoder
    from serve.runtime.step_lm_torch import TorchStepLM

    model = AutoModelForCausalLM.from_pretrained(build_decoder(arch, tmp_path / arch)).eval()
    lm = TorchStepLM(model, 128)
    lm.table.pass_tokens = 4
    prompts = _prompts(lm.vocab_size, (60, 9, 30, 7, 5, 12))
    solo = [alone(lm, p, n)[0] for p, (_, _, n) in zip(prompts, SCHEDULE, strict=True)]
    counts = _counting(lm)
    got, _ = interleaved(lm, prompts)
    assert max(counts) >= 3
    assert [got[i] for i in range(len(SCHEDULE))] == solo
    assert lm.table.lengths == {} and lm.table.groups == ()
