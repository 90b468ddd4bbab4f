"""Current decoder architectures on the torch path (issue 19): a LoRA merge, the merged
artifact in the engine (concurrent greedy requests equal each alone, chunked prefill and
prefix-KV copy-in equal a whole prefill; Qwen3.5's linear-attention states slotted per
sequence), a layer-dropped student with a valid layer pattern, eval; a conv-state
architecture (LFM2) refused by the engine in one line."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from compress.tiny import build_adapter
from compress.tiny_archs import LORA_TARGETS, SLIDING_WINDOW, build_decoder
from serve.engine.core import Engine, EngineConfig
from serve.errors import ArtifactError
from serve.runtime.loader import load_runtime
from serve.runtime.protocol import GenerationParams
from serve.runtime.step_lm_torch import TorchStepLM
from tests.unit.variant_fixtures import run

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

CLASSES = {"qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
           "smollm3": "SmolLM3ForCausalLM", "phi3": "Phi3ForCausalLM",
           "gemma4": "Gemma4ForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM"}
PROMPT_LENGTHS = (5, 14, 3, 20)  # two reach past the sliding window
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=list(CLASSES))
def merged(request, tmp_path_factory):
    """(architecture, merge records, merged artifact folder) of a tiny model + LoRA."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"arch-{arch}")
    base = build_decoder(arch, root / "base")
    adapter = build_adapter(base, root / "lora", "text-generation",
                            target_modules=LORA_TARGETS[arch])
    out, records = run(f"""
name: {arch}
task: text-generation
base: {{path: {base}}}
adapters: [{{path: {adapter}}}]
stages: [{{kind: merge, tolerance: 1.0e-4}}]
variants: []
""", root)
    return arch, records, out / "merge"


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[2, *rng.integers(4, vocab - 1, size=n - 1).tolist()] for n in PROMPT_LENGTHS]


async def _tokens(seq) -> list[int]:
    out = []
    while True:
        event = await seq.queue.get()
        if event.error is not None:
            raise event.error
        if event.token is None:
            return out
        out.append(event.token)


def test_lora_merge_matches_base_plus_adapter(merged):
    arch, records, folder = merged
    assert records["merge"].status == "built", records["merge"]
    assert records["merge"].metrics["max_abs_diff"] < 1e-4
    assert records["merge"].metrics["top1_agreement"] == 1.0
    assert (folder / "model.safetensors").is_file()
    assert type(load_runtime(folder, device="cpu").model).__name__ == CLASSES[arch]


def test_engine_concurrent_greedy_equals_alone(merged):
    _, _, folder = merged
    lm = load_runtime(folder, device="cpu").step_lm()
    prompts = _prompts(lm.vocab_size)
    params = GenerationParams(max_new_tokens=NEW_TOKENS)

    async def main():
        # no EOS: every request runs its full length, so outputs compare token for token
        engine = Engine(lm, set(), EngineConfig(max_running=8))
        try:
            alone = [await _tokens(engine.submit(p, params)) for p in prompts]
            together = await asyncio.gather(*(_tokens(engine.submit(p, params))
                                              for p in prompts))
        finally:
            engine.close()
        return alone, together

    alone, together = asyncio.run(main())
    assert all(len(a) == NEW_TOKENS for a in alone)
    assert max(PROMPT_LENGTHS) + NEW_TOKENS > SLIDING_WINDOW
    assert list(together) == alone  # fp32: exactly


def test_chunked_prefill_equals_whole_prefill(merged):
    arch, _, folder = merged
    lm = load_runtime(folder, device="cpu").step_lm()
    prompt = _prompts(lm.vocab_size)[3]

    def greedy(slot: int, first: np.ndarray) -> list[int]:
        out = [int(first.argmax())]
        for _ in range(10):
            out.append(int(lm.decode([slot], [out[-1]])[0].argmax()))
        lm.free(slot)
        return out

    whole = greedy(0, lm.prefill(0, prompt))
    lm.prefill(1, prompt[:9])
    assert greedy(1, lm.prefill(1, prompt[9:], start=9)) == whole
    if arch == "qwen3_5":  # a recurrent state cannot be restored at a block boundary
        assert lm.chunked_prefill and not lm.copies_kv
        return
    lm.prefill(2, prompt[:11])
    blocks = [lm.read_kv(2, 0, 6), lm.read_kv(2, 6, 11)]
    lm.free(2)
    lm.load_prefix(3, blocks)  # prefix-KV copy-in, then the rest of the prompt
    assert greedy(3, lm.prefill(3, prompt[11:], start=11)) == whole


#: Teacher layers the student keeps: every other one (the last always kept), except where
#: that would break the architecture (Gemma 4 needs a producer of each KV-shared type).
STUDENT_LAYERS = {"gemma4": [0, 2, 3, 5], "qwen3_5": [0, 2]}


def test_layer_dropped_student_keeps_a_valid_layer_pattern(merged, tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.errors import InputError
    from compress.stages.distill_student import slice_teacher

    arch, _, folder = merged
    teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
    n = teacher.config.num_hidden_layers
    layers = STUDENT_LAYERS.get(arch, list(range(1, n, 2)))
    student = slice_teacher(teacher, layers)
    types = getattr(teacher.config, "layer_types", None)
    if types is not None:
        assert student.config.layer_types == [types[i] for i in layers]
    if arch == "smollm3":
        assert student.config.no_rope_layers == [teacher.config.no_rope_layers[i]
                                                 for i in layers]
    if arch == "gemma4":
        assert student.config.num_kv_shared_layers == 2  # teacher layers 3 and 5
        per_layer = teacher.model.embed_tokens_per_layer.weight.unflatten(1, (n, -1))
        assert torch.equal(
            student.model.embed_tokens_per_layer.weight.unflatten(1, (len(layers), -1)),
            per_layer[:, layers])
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([_prompts(teacher.config.vocab_size)[3]])
    with torch.no_grad():
        logits = student(ids).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(reloaded(ids).logits, logits)
    if arch == "qwen3_5":  # linear-attention layers only: no full_attention left
        with pytest.raises(InputError, match="keep no full_attention layer"):
            slice_teacher(teacher, [1, 3])
    if arch == "gemma4":  # the KV-sharing tail would reuse a type no kept layer produces
        with pytest.raises(InputError, match="cannot keep layers"):
            slice_teacher(teacher, [1, 3, 5])


def test_eval_scores_perplexity(merged):
    from compress.data import Example
    from compress.evaluate import evaluate
    from compress.tiny import WORDS

    _, _, folder = merged
    runtime = load_runtime(folder, device="cpu")
    # one text longer than the 128-token context, so perplexity is scored in windows
    examples = [Example(text=" ".join(WORDS[k:k + 20] * n)) for k, n in ((0, 1), (5, 9))]
    result = evaluate(runtime, examples, reference_runtime=runtime, progress=False)
    assert result["metric"] == "perplexity" and 1 < result["value"] < 1e4
    assert result["reference"]["agreement"] == 1.0 and result["reference"]["kl"] < 1e-9


@pytest.mark.parametrize("arch", ["gemma3", "phi3", "gemma4", "qwen3_5"])
def test_eager_attention_batched_equals_alone(arch, tmp_path):
    """The additive decode masks (eager attention): sliding windows, per-type masks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_decoder(arch, tmp_path / arch),
                                                 attn_implementation="eager").eval()
    lm = TorchStepLM(model, 128)
    prompts = _prompts(lm.vocab_size)

    def alone(prompt: list[int]) -> list[int]:
        out = [int(lm.prefill(0, prompt).argmax())]
        for _ in range(15):
            out.append(int(lm.decode([0], [out[-1]])[0].argmax()))
        lm.free(0)
        return out

    solo = [alone(p) for p in prompts]
    together = {slot: [int(lm.prefill(slot, p).argmax())] for slot, p in enumerate(prompts)}
    for _ in range(15):
        slots = list(together)
        for slot, row in zip(slots, lm.decode(slots, [together[s][-1] for s in slots]),
                             strict=True):
            together[slot].append(int(row.argmax()))
    assert [together[s] for s in range(len(prompts))] == solo


def test_a_conv_state_architecture_is_refused_in_one_line():
    from transformers import AutoModelForCausalLM, Lfm2Config

    common = {"vocab_size": 82, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1}
    model = AutoModelForCausalLM.from_config(Lfm2Config(
        **common, layer_types=["conv", "full_attention"] * 2)).eval()
    with pytest.raises(ArtifactError) as err:
        TorchStepLM(model, 128)
    message = str(err.value)
    assert "\n" not in message and "Lfm2ForCausalLM" in message
    assert "torch format" in message and "conv layers" in message
