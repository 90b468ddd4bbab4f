"""Compare grammar libraries for structured outputs on one tokenizer.

For llguidance, xgrammar and outlines-core: the time to compile the JSON schema of
:mod:`bench.structured_outputs` for the tokenizer, the time per decode step to compute the
token masks of 8 streams (each advanced with a token of its own), and correctness (a
walk that takes random allowed tokens ends in JSON that validates against the schema).

The libraries need not be installed in the project; put them on ``PYTHONPATH``
(``pip install --no-deps --target DIR llguidance xgrammar outlines-core
apache-tvm-ffi``). Run::

    python -m bench.grammar_libs --tokenizer build/bench/artifacts-smollm2/int4-gguf
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.structured_outputs import SCHEMA

log = logging.getLogger(__name__)

STREAMS = 8
MAX_STEPS = 400


class _Lib:
    """One library behind a common interface: ``compile``, then per stream
    ``mask(state) -> bool array`` and ``advance(state, token)``, ``done(state)``."""

    name = ""

    def compile(self, schema: dict) -> Any:
        raise NotImplementedError

    def start(self, compiled: Any) -> Any:
        raise NotImplementedError

    def masks(self, states: list[Any]) -> np.ndarray:
        raise NotImplementedError

    def advance(self, state: Any, token: int) -> None:
        raise NotImplementedError


class _LLGuidance(_Lib):
    name = "llguidance"

    def __init__(self, hf_tok: Any, vocab: int, own_reading: bool = False) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        from serve.engine.grammar import GrammarCompiler
        self.ll, self.lln = llguidance, llguidance.numpy
        self.tok = (llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab) if own_reading
                    else GrammarCompiler(hf_tok, {hf_tok.eos_token_id}).tokenizer)
        self.vocab = vocab
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        matcher = self.ll.LLMatcher(self.tok, grammar)  # the first matcher compiles
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def start(self, compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tok, compiled)

    def masks(self, states: list[Any]) -> np.ndarray:
        bits = self.lln.allocate_token_bitmask(len(states), self.vocab)
        self.lln.fill_next_token_bitmask_par(self.executor,
                                             [(m, i) for i, m in enumerate(states)], bits)
        return _unpack(bits, self.vocab)

    def advance(self, state: Any, token: int) -> None:
        assert state.consume_token(token), state.get_error()

    def done(self, state: Any) -> bool:
        return state.is_stopped()


class _LLGuidanceHF(_LLGuidance):
    name = "llguidance (its own tokenizer.json reading)"

    def __init__(self, hf_tok: Any, vocab: int) -> None:
        super().__init__(hf_tok, vocab, own_reading=True)


class _XGrammar(_Lib):
    name = "xgrammar"

    def __init__(self, hf_tok: Any, vocab: int) -> None:
        import xgrammar
        self.xg = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.vocab = vocab

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def start(self, compiled: Any) -> Any:
        return self.xg.GrammarMatcher(compiled)

    def masks(self, states: list[Any]) -> np.ndarray:
        bits = self.xg.allocate_token_bitmask(len(states), self.vocab)
        for i, m in enumerate(states):
            m.fill_next_token_bitmask(bits, i)
        return _unpack(bits.numpy(), self.vocab)

    def advance(self, state: Any, token: int) -> None:
        assert state.accept_token(token)

    def done(self, state: Any) -> bool:
        return state.is_terminated()


class _OutlinesCore(_Lib):
    name = "outlines-core"

    def __init__(self, hf_tok: Any, vocab: int) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        self.oc, self.regex_of = outlines_core, build_regex_from_schema
        self.vocab, self.eos = vocab, hf_tok.eos_token_id
        from serve.engine.grammar import token_bytes
        by_bytes: dict[bytes, list[int]] = {}
        for token_id, piece in enumerate(token_bytes(hf_tok)):
            if token_id not in hf_tok.all_special_ids:
                by_bytes.setdefault(piece, []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(self.eos, by_bytes)

    def compile(self, schema: dict) -> Any:
        return self.oc.Index(self.regex_of(json.dumps(schema), whitespace_pattern=""),
                             self.vocabulary)

    def start(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def masks(self, states: list[Any]) -> np.ndarray:
        out = np.zeros((len(states), self.vocab), dtype=bool)
        for i, guide in enumerate(states):
            out[i, guide.get_tokens()] = True
        return out

    def advance(self, state: Any, token: int) -> None:
        state.advance(token)

    def done(self, state: Any) -> bool:
        return state.is_finished()


def _unpack(bits: np.ndarray, vocab: int) -> np.ndarray:
    """Packed int32 bitmasks [batch, words] → bool [batch, vocab]."""
    flat = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
    return flat[:, :vocab].astype(bool)




def run_lib(lib: _Lib, hf_tok: Any, seed: int) -> dict[str, Any]:
    """Compile, then walk 8 streams with random allowed tokens; time it and check it."""
    import jsonschema
    t0 = time.perf_counter()
    compiled = lib.compile(SCHEMA)
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    states = [lib.start(compiled) for _ in range(STREAMS)]
    tokens: list[list[int]] = [[] for _ in range(STREAMS)]
    eos = hf_tok.eos_token_id
    step_ms, valid, finished = [], 0, 0
    live = list(range(STREAMS))
    for _ in range(MAX_STEPS):
        if not live:
            break
        t0 = time.perf_counter()
        masks = lib.masks([states[i] for i in live])
        step_ms.append((time.perf_counter() - t0) * 1000)
        still = []
        for row, i in zip(masks, live, strict=True):
            allowed = np.flatnonzero(row)
            # favour ending: EOS when allowed, else a random allowed token
            token = eos if row[eos] else int(rng.choice(allowed))
            if token == eos:
                finished += 1
                text = hf_tok.decode(tokens[i])
                try:
                    jsonschema.validate(json.loads(text), SCHEMA)
                    valid += 1
                except (ValueError, jsonschema.ValidationError) as exc:
                    log.warning("%s: invalid answer %r (%s)", lib.name, text, exc)
                continue
            lib.advance(states[i], token)
            tokens[i].append(token)
            still.append(i)
        live = still
    return {"library": lib.name, "compile_ms": round(compile_s * 1000, 1),
            "mask_ms_per_step_8_streams": round(statistics.median(step_ms), 3),
            "mask_ms_p90": round(sorted(step_ms)[int(0.9 * len(step_ms))], 3),
            "finished": finished, "valid": valid, "streams": STREAMS}


def main(argv: list[str] | None = None) -> None:
    """Measure each library named on the command line; print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    parser.add_argument("--libs", default="llguidance,llguidance-hf,xgrammar,outlines-core")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = len(hf_tok)
    makers: dict[str, Callable[[Any, int], _Lib]] = {
        "llguidance": _LLGuidance, "llguidance-hf": _LLGuidanceHF, "xgrammar": _XGrammar,
        "outlines-core": _OutlinesCore}
    for name in args.libs.split(","):
        t0 = time.perf_counter()
        lib = makers[name](hf_tok, vocab)
        setup_ms = round((time.perf_counter() - t0) * 1000, 1)
        result = {**run_lib(lib, hf_tok, args.seed), "tokenizer_setup_ms": setup_ms}
        log.info("%s", json.dumps(result))


if __name__ == "__main__":
    main()
