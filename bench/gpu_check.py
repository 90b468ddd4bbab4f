"""CUDA checks for a lent GPU machine, each against the CPU in the same run.

    python -m bench.gpu_check ARTIFACTS --out gpu_check.json

``ARTIFACTS`` holds ``cls/`` and ``gen/``, the outputs of the tiny recipes
(``modelpress compress recipes/tiny-{classification,generation}.yaml``). Measured:

* torch runtime, classifier: CUDA fp32 / fp16 / bf16 probabilities against CPU fp32;
* torch runtime, LM: CUDA fp32 greedy text equal to CPU; fp16 / bf16 agreement with it;
* bitsandbytes NF4 on CUDA against the same artifact on the CPU kernels;
* the continuous-batching engine on CUDA: 8 concurrent greedy streams equal each stream
  run alone; aggregate decode tok/s at 1 / 8 / 32 streams, CPU and CUDA, on a random
  LM of SmolLM2-135M's shape (weights random: a speed figure, not a quality one);
* where a decode step's time goes on CUDA: bare transformers forward vs the engine's step
  LM (ms per step), and ``generate``'s tok/s at batch 1 / 8;
* ONNX Runtime's CUDA execution provider on the ONNX classifier, where installed.

Every check is independent: one that fails records its error and the rest still run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from serve.artifact import read_manifest

log = logging.getLogger(__name__)
DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"


def _texts(name: str, n: int) -> list[str]:
    lines = (DATA / name).read_text().splitlines()[:n]
    return [json.loads(line)["text"] for line in lines]


def _torch_runtime(path: Path, device: str, precision: str | None = None) -> Any:
    from serve.runtime.runtime_torch import TorchRuntime

    manifest = read_manifest(path)
    if precision:
        manifest = manifest.model_copy(update={"precision": precision})
    return TorchRuntime(path, manifest, device)


def check_env() -> dict:
    """Versions, the GPU, ORT's providers and whether bitsandbytes imports."""
    import torch
    import transformers

    out: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        out["ort_providers"] = ort.get_available_providers()
    except ImportError as exc:
        out["onnxruntime"] = f"missing: {exc}"
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # a broken native library raises more than ImportError
        out["bitsandbytes"] = f"unavailable: {exc}"
    return out


def check_classifier(root: Path) -> dict:
    """Probabilities on CUDA in fp32/fp16/bf16 against CPU fp32 (max abs diff, argmax)."""
    texts = _texts("tiny-sentiment.jsonl", 64)
    ref = _torch_runtime(root / "cls" / "merge", "cpu").class_probabilities(texts)
    out = {}
    for precision in ("fp32", "fp16", "bf16"):
        got = _torch_runtime(root / "cls" / "merge", "cuda", precision).class_probabilities(texts)
        out[precision] = {"max_abs_diff": float(np.abs(got - ref).max()),
                          "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}
    return out


def _greedy(runtime: Any, prompts: list[str], n: int) -> list[str]:
    from serve.runtime.protocol import GenerationParams

    return [g.text for g in runtime.generate(prompts, GenerationParams(max_new_tokens=n))]


def check_generation(root: Path) -> dict:
    """Greedy texts on CUDA (fp32 / fp16 / bf16) against CPU fp32: how many are equal."""
    prompts = _texts("tiny-text.jsonl", 16)
    ref = _greedy(_torch_runtime(root / "gen" / "merge", "cpu"), prompts, 16)
    out = {}
    for precision in ("fp32", "fp16", "bf16"):
        got = _greedy(_torch_runtime(root / "gen" / "merge", "cuda", precision), prompts, 16)
        out[precision] = {"equal_to_cpu_fp32": sum(a == b for a, b in zip(got, ref, strict=True)),
                          "of": len(prompts)}
    return out


def check_nf4(root: Path) -> dict:
    """bitsandbytes NF4 artifacts on CUDA against the CPU kernels."""
    texts = _texts("tiny-sentiment.jsonl", 64)
    cpu = _torch_runtime(root / "cls" / "torch-nf4", "cpu").class_probabilities(texts)
    gpu = _torch_runtime(root / "cls" / "torch-nf4", "cuda").class_probabilities(texts)
    prompts = _texts("tiny-text.jsonl", 16)
    gen_cpu = _greedy(_torch_runtime(root / "gen" / "torch-nf4", "cpu"), prompts, 16)
    gen_gpu = _greedy(_torch_runtime(root / "gen" / "torch-nf4", "cuda"), prompts, 16)
    return {"classifier_max_abs_diff": float(np.abs(gpu - cpu).max()),
            "classifier_argmax_agreement": float((gpu.argmax(1) == cpu.argmax(1)).mean()),
            "generation_equal": sum(a == b for a, b in zip(gen_gpu, gen_cpu, strict=True)),
            "of": len(prompts)}


async def collect_tokens(engine: Any, ids: list[int], n: int) -> list[int]:
    """Submit one greedy request to ``engine`` and return its generated token ids."""
    from serve.runtime.protocol import GenerationParams

    seq = engine.submit(ids, GenerationParams(max_new_tokens=n))
    tokens = []
    while (event := await seq.queue.get()).token is not None:
        tokens.append(event.token)
    return tokens


def make_engine(runtime: Any, streams: int, eos: bool = True) -> Any:
    """An engine over ``runtime``'s step LM for ``streams`` sequences (EOS off: fixed length)."""
    from serve.engine.core import Engine, EngineConfig

    return Engine(runtime.step_lm(), set(runtime.eos_ids) if eos else set(),
                  EngineConfig(max_running=streams))


def alone_and_together(runtime: Any, prompts: list[list[int]],
                       n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens of each prompt run alone, then of all run concurrently, on one engine."""
    async def run() -> tuple[list, list]:
        engine = make_engine(runtime, len(prompts))
        try:
            alone = [await collect_tokens(engine, ids, n) for ids in prompts]
            together = await asyncio.gather(*(collect_tokens(engine, ids, n) for ids in prompts))
            return alone, list(together)
        finally:
            engine.close()

    return asyncio.run(run())


def check_engine_interleaving(root: Path) -> dict:
    """8 concurrent greedy streams on CUDA equal each request run alone (fp32)."""
    runtime = _torch_runtime(root / "gen" / "merge", "cuda")
    prompts = [list(runtime.tokenizer(p)["input_ids"]) for p in _texts("tiny-text.jsonl", 8)]
    alone, together = alone_and_together(runtime, prompts, 24)
    return {"equal": sum(a == b for a, b in zip(alone, together, strict=True)), "of": len(prompts),
            "tokens": sum(map(len, together))}


def _random_lm(root: Path, work: Path) -> Path:
    """A random LM of SmolLM2-135M's shape in a copy of the tiny LM's artifact folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / "random-135m"
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "gen" / "merge", folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer_config = folder / "tokenizer_config.json"  # the tiny one caps length at 128
    settings = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps({**settings, "model_max_length": 2048}))
    return folder


def check_engine_speed(root: Path, work: Path) -> dict:
    """Aggregate decode tok/s of the engine, CPU vs CUDA fp32 / bf16, one run."""
    from bench.engine_speed import measure

    folder = _random_lm(root, work)
    out = {}
    for device, precision, streams in (("cpu", "fp32", (1, 8)), ("cuda", "fp32", (1, 8, 32)),
                                       ("cuda", "bf16", (1, 8, 32))):
        runtime = _torch_runtime(folder, device, precision)
        ids = list(runtime.tokenizer(_texts("tiny-text.jsonl", 1)[0])["input_ids"])

        async def run(rt: Any = runtime, ids: list[int] = ids,
                      streams: tuple = streams) -> list[dict]:
            engine = make_engine(rt, max(streams), eos=False)
            try:
                await measure(engine, ids, 1, 8)  # warm-up
                return [await measure(engine, ids, s, 128) for s in streams]
            finally:
                engine.close()

        out[f"{device}-{precision}"] = asyncio.run(run())
    return out


def check_decode_overhead(root: Path, work: Path) -> dict:
    """One decode step on CUDA: bare transformers forward vs the engine's step LM (ms), and
    ``generate``'s tok/s, on the random 135M-shaped LM (where a step's time goes)."""
    import torch

    folder = _random_lm(root, work)
    out: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        runtime = _torch_runtime(folder, "cuda", precision)
        prompt = list(runtime.tokenizer(_texts("tiny-text.jsonl", 1)[0])["input_ids"])
        ids = torch.tensor([prompt], device="cuda")
        for batch in (1, 8):
            x = ids.repeat(batch, 1)
            runtime.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8,
                                   min_new_tokens=8, do_sample=False)
            torch.cuda.synchronize()
            start = time.perf_counter()
            runtime.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=128,
                                   min_new_tokens=128, do_sample=False)
            torch.cuda.synchronize()
            out[f"generate_tok_s_{precision}_b{batch}"] = round(
                128 * batch / (time.perf_counter() - start), 1)
        with torch.inference_mode():
            step = runtime.model(ids, use_cache=True)
            cache, token = step.cache, step.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(50):
                step = runtime.model(token, cache=cache, use_cache=True)
                token = step.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        out[f"bare_forward_ms_{precision}"] = round((time.perf_counter() - start) * 20, 2)
        lm = runtime.step_lm()
        token = int(lm.prefill(0, prompt).argmax())
        start = time.perf_counter()
        for _ in range(50):
            token = int(lm.decode([0], [token])[0].argmax())
        out[f"step_lm_decode_ms_{precision}"] = round((time.perf_counter() - start) * 20, 2)
        lm.free(0)
    return out


def check_ort_cuda(root: Path) -> dict:
    """The ONNX classifier on ORT's CUDA EP against its CPU EP (logits max abs diff)."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"no CUDAExecutionProvider in {ort.get_available_providers()}"}
    folder = root / "cls" / "onnx-fp32"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(_texts("tiny-sentiment.jsonl", 64), padding=True, return_tensors="np")
    outputs = []
    for providers in (["CPUExecutionProvider"], ["CUDAExecutionProvider"]):
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=providers)
        names = {i.name for i in session.get_inputs()}
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
        start = time.perf_counter()
        outputs.append(session.run(None, feed)[0])
        log.info("%s: %.1f ms", providers[0], (time.perf_counter() - start) * 1000)
    return {"max_abs_diff": float(np.abs(outputs[1] - outputs[0]).max()),
            "providers": session.get_providers()}


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    checks: dict[str, Callable[[], dict]] = {
        "env": check_env,
        "classifier": lambda: check_classifier(args.artifacts),
        "generation": lambda: check_generation(args.artifacts),
        "nf4": lambda: check_nf4(args.artifacts),
        "engine_interleaving": lambda: check_engine_interleaving(args.artifacts),
        "ort_cuda": lambda: check_ort_cuda(args.artifacts),
        "engine_speed": lambda: check_engine_speed(args.artifacts, work / "speed"),
        "decode_overhead": lambda: check_decode_overhead(args.artifacts, work / "overhead"),
    }
    results: dict[str, Any] = {}
    for name, check in checks.items():
        start = time.monotonic()
        try:
            results[name] = check()
        except Exception as exc:  # record and go on: each check stands alone
            results[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc(limit=4)[-1500:]}
        results[name]["seconds"] = round(time.monotonic() - start, 1)
        print(json.dumps({name: results[name]}), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
