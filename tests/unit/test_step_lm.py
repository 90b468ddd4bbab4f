"""StepLM (prefill / batched decode / free): greedy tokens under continuous batching equal
each prompt decoded alone and ``model.generate``, for the torch and optimum-ONNX runtimes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compress.models import copy_model_folder
from serve.artifact import Manifest, write_manifest
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import ContextLengthExceeded

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

TEXTS = ["the movie", "what is the capital of france ? i really hate this film , it was so dull",
         "i love", "a cat and a dog in the city of paris was not very good but really quite fun",
         "yes", "the best story with the worst actor and the music was so sad and boring"]
#: Per request: step it joins at, slot id, tokens to generate. Request 4 reuses request 0's
#: slot after it is freed; every 4th step decodes only a subset of the running slots.
SCHEDULE = [(0, 5, 6), (1, 2, 20), (1, 7, 15), (3, 0, 20), (6, 5, 12), (8, 3, 20)]
N_ALONE = 20


def artifact(src: Path, dst: Path, fmt: str, precision: str = "fp32") -> Path:
    """Copy a model folder (or export it to ONNX) into an artifact with a manifest."""
    dst.mkdir(parents=True)
    if fmt == "onnx":
        from compress.stages.export import export_onnx

        export_onnx(src, dst, "text-generation")
    else:
        copy_model_folder(src, dst)
    write_manifest(dst, Manifest(name=dst.name, task="text-generation", format=fmt,
                                 precision=precision))
    return dst


@pytest.fixture(scope="module")
def runtimes(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    return {fmt: load_runtime(artifact(tiny["llama"], root / fmt, fmt), device="cpu")
            for fmt in ("torch", "onnx")}


@pytest.fixture(scope="module")
def prompts(runtimes):
    tok = runtimes["torch"].tokenizer
    ids = [tok(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in ids}) >= 5  # different prompt lengths
    return ids


def alone(step, prompt: list[int], n: int, slot: int = 0) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and logits of one prompt decoded by itself."""
    rows = [step.prefill(slot, prompt)]
    out = [int(rows[-1].argmax())]
    for _ in range(n - 1):
        rows.append(step.decode([slot], [out[-1]])[0])
        out.append(int(rows[-1].argmax()))
    step.free(slot)
    return out, np.stack(rows)


def interleaved(step, prompts: list[list[int]]) -> tuple[dict[int, list[int]], dict]:
    """Run SCHEDULE: requests join, decode together (some steps a subset) and leave."""
    got: dict[int, list[int]] = {i: [] for i in range(len(SCHEDULE))}
    logits: dict[int, list[np.ndarray]] = {i: [] for i in range(len(SCHEDULE))}
    running: dict[int, int] = {}
    widths = []
    for number in range(60):
        for i, (start, slot, _) in enumerate(SCHEDULE):
            if start == number:
                assert slot not in running
                logits[i].append(step.prefill(slot, prompts[i]))
                got[i].append(int(logits[i][-1].argmax()))
                running[slot] = i
        todo = [s for s, i in running.items() if len(got[i]) < SCHEDULE[i][2]]
        if number % 4 == 3 and len(todo) > 1:
            todo = todo[::-2]  # a subset, in another order
        if todo:
            rows = step.decode(todo, [got[running[s]][-1] for s in todo])
            assert rows.shape == (len(todo), step.vocab_size) and rows.dtype == np.float32
            for s, row in zip(todo, rows, strict=True):
                got[running[s]].append(int(row.argmax()))
                logits[running[s]].append(row)
            widths.append(len(todo))
        for s, i in list(running.items()):
            if len(got[i]) >= SCHEDULE[i][2]:
                step.free(s)
                del running[s]
        if not running and number > max(start for start, _, _ in SCHEDULE):
            break
    assert max(widths) >= 4  # several sequences really shared decode steps
    return got, {i: np.stack(rows) for i, rows in logits.items()}


@pytest.mark.parametrize("fmt", ["torch", "torch-eager", "onnx"])
def test_interleaved_greedy_equals_alone_and_generate(runtimes, prompts, fmt, tiny):
    if fmt == "torch-eager":  # the additive-mask path (the runtime loads sdpa)
        from transformers import AutoModelForCausalLM

        from serve.runtime.step_lm_torch import TorchStepLM

        eager = AutoModelForCausalLM.from_pretrained(tiny["llama"], attn_implementation="eager")
        step = TorchStepLM(eager.eval(), 128)
    else:
        step = runtimes[fmt].step_lm()
    model = runtimes["torch"].model
    solo = [alone(step, p, N_ALONE) for p in prompts]
    for prompt, (ids, _) in zip(prompts, solo, strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
                1, len(prompt), dtype=torch.long), max_new_tokens=N_ALONE, do_sample=False,
                pad_token_id=0, eos_token_id=None)
        assert ids == out[0, len(prompt):].tolist()
    got, logits = interleaved(step, prompts)
    for i, (_, _, n) in enumerate(SCHEDULE):
        assert got[i] == solo[i][0][:n], i
        np.testing.assert_allclose(logits[i], solo[i][1][:n], atol=1e-5)
    assert step.table.lengths == {} and step.table.groups == ()  # everything freed


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_free_releases_the_slot_and_subset_decode(runtimes, prompts, fmt):
    step = runtimes[fmt].step_lm()
    solo = [alone(step, p, 6)[0] for p in prompts[:3]]
    first = [int(step.prefill(slot, p).argmax()) for slot, p in enumerate(prompts[:3])]
    seqs = [[t] for t in first]
    rows = step.decode([2, 0], [seqs[2][-1], seqs[0][-1]])  # slot 1 waits this step
    seqs[2].append(int(rows[0].argmax()))
    seqs[0].append(int(rows[1].argmax()))
    with pytest.raises(ValueError, match="slot 1 is in use"):
        step.prefill(1, prompts[1])
    for _ in range(5):
        rows = step.decode([0, 1, 2], [s[-1] for s in seqs])
        for s, row in zip(seqs, rows, strict=True):
            s.append(int(row.argmax()))
    assert seqs[1][:6] == solo[1]
    assert seqs[0][:6] == solo[0] and seqs[2][:6] == solo[2]
    longest = max(range(3), key=lambda i: len(prompts[i]) + len(seqs[i]))
    step.free(longest)
    assert longest not in step.table.lengths
    # the batch shrinks to the longest remaining sequence at once
    assert max(group.width for group in step.table.groups) == max(len(prompts[i]) + len(seqs[i]) - 1
                                   for i in range(3) if i != longest)
    with pytest.raises(ValueError, match="no cache"):
        step.decode([longest], [1])
    assert alone(step, prompts[longest], 6, slot=longest)[0] == solo[longest]
    for slot in range(3):
        if slot != longest:
            step.free(slot)
    assert step.table.groups == () and step.table.lengths == {}


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_context_is_bounded(runtimes, fmt):
    step = runtimes[fmt].step_lm()
    assert step.max_length == 128 and step.vocab_size == 82
    with pytest.raises(ContextLengthExceeded):
        step.prefill(0, [2] * step.max_length)
    with pytest.raises(ValueError, match="no tokens"):
        step.prefill(0, [])
    step.prefill(0, [2] * (step.max_length - 1))  # room for one more token
    step.decode([0], [5])
    with pytest.raises(ValueError, match="fill the context of 128"):
        step.decode([0], [5])
    step.free(0)
    assert step.decode([], []).shape == (0, 82)


def test_bitsandbytes_nf4_runs_through_the_torch_path(tiny, tmp_path, prompts):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from compress.stages.quantize import bnb_quantize

    # bitsandbytes' CPU 4-bit kernels need in_features % 64 == 0: a wider Llama than the tiny one
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False))
    wide.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    wide.save_pretrained(tmp_path / "wide", safe_serialization=True)
    tok.save_pretrained(tmp_path / "wide")
    dst = tmp_path / "nf4"
    dst.mkdir()
    bnb_quantize(tmp_path / "wide", dst, "text-generation", "nf4")
    write_manifest(dst, Manifest(name="nf4", task="text-generation", format="torch",
                                 precision="nf4"))
    rt = load_runtime(dst, device="cpu")
    assert type(rt.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    step = rt.step_lm()
    solo = [alone(step, p, N_ALONE) for p in prompts]
    got, logits = interleaved(step, prompts)
    for i, (_, _, n) in enumerate(SCHEDULE):
        # measured: identical tokens, logits within 2e-7 of the lone run (kernel rounding)
        assert got[i] == solo[i][0][:n], i
        np.testing.assert_allclose(logits[i], solo[i][1][:n], atol=1e-5)
