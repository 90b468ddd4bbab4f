"""llama.cpp's own quality on the eval text: perplexity and agreement with the reference.

llama.cpp quantizes activations to 8 bits for its Q4_1 / Q8_0 dot products, as ONNX
Runtime's MatMulNBits does at ``accuracy_level`` 4, so its next-token agreement with the
fp32 reference says what agreement is reachable at llama.cpp's speed. The peer is scored
teacher-forced through the same code as every artifact (``compress.evaluate``): the same
windows and the same token ids (the reference's tokenizer), llama.cpp's logits for every
position (``logits_all``), compared with the reference's predictions.

    python -m bench.peer_quality --gguf build/bench/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --reference build/bench/artifacts-smollm2-q15/merge --data build/bench/lm-eval.jsonl \\
        --json build/q15/peer-quality.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers import PEERS_PYTHON

log = logging.getLogger(__name__)

# Runs in the peers venv: one JSON list of token ids per stdin line, the logits [T, V]
# written to the .npy path given on the same line, "ok" printed back.
LLAMA_LOGITS_SCRIPT = """
import json, sys
import numpy as np
import llama_cpp.llama_cpp as low
from llama_cpp import Llama
if sys.argv[4] == "0":  # llama.cpp's --no-repack: plain weight buffers, no CPU repacking
    defaults = low.llama_model_default_params
    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params
    low.llama_model_default_params = no_repack
llm = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=int(sys.argv[2]),
            n_threads=int(sys.argv[3]), logits_all=True, verbose=False, seed=0)
for line in sys.stdin:
    job = json.loads(line)
    llm.reset()
    llm.eval(job["ids"])
    np.save(job["out"], np.asarray(llm.scores[:len(job["ids"])], dtype=np.float32))
    print("ok", flush=True)
"""


# Runs in the peers venv: a JSON list of texts on stdin, llama.cpp's token ids (BOS/EOS as
# the GGUF's flags say, special tokens not parsed) printed back as one JSON list.
LLAMA_TOKENS_SCRIPT = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts = json.load(sys.stdin)
print(json.dumps([llm.tokenize(t.encode(), add_bos=True, special=False) for t in texts]))
"""


def llama_cpp_token_ids(gguf: Path, texts: list[str],
                        python: Path = PEERS_PYTHON) -> list[list[int]]:
    """llama.cpp's tokenization of ``texts`` with the GGUF's own vocabulary."""
    done = subprocess.run([str(python), "-c", LLAMA_TOKENS_SCRIPT, str(gguf)],
                          input=json.dumps(texts), capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def tokenizer_parity(gguf: Path, texts: list[str], python: Path = PEERS_PYTHON
                     ) -> dict[str, Any]:
    """How many ``texts`` the import's GGUF tokenizer rebuild tokenizes as llama.cpp does."""
    from compress.stages.gguf_tokenizer import read_vocab, reference_ids, reference_tokenizer

    vocab = read_vocab(gguf)
    reference = reference_tokenizer(vocab)
    peer = llama_cpp_token_ids(gguf, texts, python)
    ours = [reference_ids(reference, vocab, t) for t in texts]
    differing = [t for t, a, b in zip(texts, ours, peer, strict=True) if a != b]
    return {"gguf": str(gguf), "tokenizer": f"{vocab.model}/{vocab.pre}", "texts": len(texts),
            "identical": len(texts) - len(differing), "differing": differing}


class _Manifest:
    task = "text-generation"


class LlamaCppScorer:
    """The ``Runtime`` slice ``compress.evaluate.predict`` needs, backed by llama.cpp.

    Args:
        gguf: The GGUF file.
        tokenizer_dir: A folder with the reference's tokenizer (ids shared with it).
        python: The peers venv's Python (llama-cpp-python).
        max_length: Token window (the evaluation's, 256).
        threads: llama.cpp threads.
        repack: llama.cpp's CPU weight repacking (false: its ``--no-repack``). Off by
            default: llama-cpp-python 0.3.36 as ``make peers-venv`` builds it on this
            machine (AVX512/AMX) segfaults evaluating with it (SmolLM2's Q4_1 and Gemma-3's
            Q4_K_M files alike).
    """

    manifest = _Manifest()

    def __init__(self, gguf: Path, tokenizer_dir: Path, python: Path = PEERS_PYTHON,
                 max_length: int = 256, threads: int = 2, repack: bool = False) -> None:
        from transformers import AutoTokenizer

        if not python.exists():
            raise FileNotFoundError(f"{python}: no peers venv; run `make peers-venv`")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.max_length = max_length
        self._tmp = tempfile.TemporaryDirectory(prefix="peer-logits-")
        self._proc = subprocess.Popen(
            [str(python), "-c", LLAMA_LOGITS_SCRIPT, str(gguf), str(max_length), str(threads),
             str(int(repack))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def count_tokens(self, text: str) -> int:
        """Tokens the reference's tokenizer makes of ``text``."""
        return len(self.tokenizer(text)["input_ids"])

    def next_token_logprobs(self, texts: list[str], max_length: int = 256) -> list[Any]:
        """Per text: (token_ids [T] int64, llama.cpp's log-softmax [T-1, V] float32)."""
        out = []
        for text in texts:
            ids = self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            path = Path(self._tmp.name) / "logits.npy"
            self._proc.stdin.write(json.dumps({"ids": ids, "out": str(path)}) + "\n")
            self._proc.stdin.flush()
            if self._proc.stdout.readline().strip() != "ok":
                raise RuntimeError(f"llama.cpp logits process failed (rc {self._proc.poll()})")
            logits = np.load(path)[: len(ids) - 1]
            logits = logits - logits.max(axis=-1, keepdims=True)
            logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            out.append((np.asarray(ids, dtype=np.int64), logprobs.astype(np.float32)))
        return out

    def close(self) -> None:
        """Stop the llama.cpp process and remove its scratch folder."""
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._tmp.cleanup()


def peer_quality(gguf: Path, reference: Path, data: Path, python: Path = PEERS_PYTHON,
                 threads: int = 2, repack: bool = False) -> dict[str, Any]:
    """Score llama.cpp on ``data`` against the reference artifact (perplexity, agreement)."""
    from compress.data import load_examples
    from compress.evaluate import predict, score
    from compress.recipe import DataFile
    from serve.runtime.loader import load_runtime

    examples = load_examples(DataFile(path=data.resolve(), label=None))
    ref_rt = load_runtime(reference, device="cpu")
    ref_pred = predict(ref_rt, examples, progress=False)
    ref = score(ref_rt.manifest.task, examples, ref_pred)
    del ref_rt
    peer = LlamaCppScorer(gguf, reference, python, threads=threads, repack=repack)
    try:
        result = score("text-generation", examples, predict(peer, examples, progress=False),
                       ref_pred)
    finally:
        peer.close()
    return {"peer": f"llama.cpp ({gguf.name})", "gguf": str(gguf), "data": str(data),
            "repack": repack,
            "reference": str(reference), "reference_perplexity": ref["value"],
            "reference_ci95": ref["ci95"], **result}


def main(argv: list[str] | None = None) -> None:
    """CLI: print (and optionally write) llama.cpp's quality against the reference."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True,
                        help="Reference artifact folder (its tokenizer is used too).")
    parser.add_argument("--data", type=Path, required=True, help="Perplexity eval JSONL.")
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repack", action="store_true",
                        help="llama.cpp with CPU weight repacking (off: its --no-repack).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = peer_quality(args.gguf, args.reference, args.data, args.peers_python,
                          args.threads, repack=args.repack)
    ref = result["reference"]
    print(f"{result['peer']}: perplexity {result['value']:.2f} "
          f"[{result['ci95'][0]:.1f}, {result['ci95'][1]:.1f}] (reference "
          f"{result['reference_perplexity']:.2f}), drop {ref['metric_drop']:+.2%} "
          f"[{ref['drop_ci95'][0]:+.2%}, {ref['drop_ci95'][1]:+.2%}], "
          f"agreement {ref['agreement']:.3f}, KL {ref['kl']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
