"""Structured outputs: JSON schemas compiled with llguidance into per-sequence token masks.

A request's ``response_format`` (or ``guided_json``) becomes a :class:`Grammar` in the
route, checked against the schema compiler there (an unsupported feature is a 400 naming
the field). In the engine each constrained sequence's sampler holds a :class:`Matcher`:
before each pick it masks the logits to the tokens the grammar allows next (EOS only
where the JSON is complete), and it advances with the token picked. Unconstrained
sequences in the same batch are untouched.

JSON is generated compact-ish (``", "`` and ``": "`` separators, no other whitespace):
a model cannot stall in an endless run of blank lines, and every answer is valid JSON.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np

from serve.errors import RequestError

log = logging.getLogger(__name__)

_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ",
                 "key_separator": ": "}
_MAX_SCHEMA_CHARS = 100_000


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint for one request: llguidance grammar text and tokenizer."""

    text: str
    tokenizer: llguidance.LLTokenizer

    def matcher(self) -> Matcher:
        """A fresh matcher for one sequence."""
        return Matcher(llguidance.LLMatcher(self.tokenizer, self.text),
                       self.tokenizer.vocab_size, self.tokenizer.eos_token)


class Matcher:
    """The grammar state of one sequence: masks its logits and follows its tokens.

    Args:
        matcher: llguidance's matcher at the start of the output.
        vocab: The tokenizer's vocabulary size (the model's logits may be wider: the
            tokens past it are never allowed).
        eos: The token that ends the output; the only one allowed once the matcher has
            failed (so a failure ends this sequence, never the batch).
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int, eos: int) -> None:
        self._m = matcher
        self._vocab, self._eos = vocab, eos
        self._bits = np.empty((vocab + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """Bool [tokenizer vocab]: the tokens the grammar allows next (EOS alone when
        the matcher failed or no token of this vocabulary can continue the output)."""
        if not self._m.is_error():
            self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
            allowed = bits[: self._vocab].astype(bool)
            if allowed.any():
                return allowed
            log.warning("grammar: no token can continue the output; ending it")
        allowed = np.zeros(self._vocab, dtype=bool)
        allowed[self._eos] = True
        return allowed

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` [vocab] with every token the grammar forbids at ``-inf`` (a copy)."""
        allowed = self.allowed()
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        n = min(len(logits), len(allowed))
        keep = allowed[:n]
        out[:n][keep] = logits[:n][keep]
        return out

    def accept(self, token: int) -> None:
        """Advance the grammar with the token picked (a masked pick is always accepted;
        a refusal is logged and the sequence then ends)."""
        if not self._m.is_error() and not self._m.consume_token(token):
            log.error("grammar refused token %d: %s", token, self._m.get_error())


class GrammarCompiler:
    """Compiles schemas for one tokenizer (built once per worker: about a second).

    Args:
        hf_tokenizer: The model's Hugging Face tokenizer.
        eos_ids: The engine's EOS ids; the grammar ends with one of them.
    """

    def __init__(self, hf_tokenizer: Any, eos_ids: set[int] | frozenset[int]) -> None:
        eos = getattr(hf_tokenizer, "eos_token_id", None)
        if eos not in eos_ids:
            eos = min(eos_ids)
        self.tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Tokens(hf_tokenizer, eos)),
            n_vocab=len(hf_tokenizer), eos_token=eos)
        self._text_tokens = np.ones(len(hf_tokenizer), dtype=bool)
        self._text_tokens[sorted(set(hf_tokenizer.all_special_ids))] = False

    def json_schema(self, field: str, schema: Any) -> Grammar:
        """The grammar of JSON valid against ``schema``.

        Raises:
            RequestError: The schema is not an object, too large, or uses a feature the
                compiler does not support (400 naming ``field``).
        """
        if not isinstance(schema, dict):
            raise RequestError(f"{field}: must be a JSON schema object")
        text = json.dumps(schema)
        if len(text) > _MAX_SCHEMA_CHARS:
            raise RequestError(f"{field}: {len(text)} characters, more than the limit of "
                               f"{_MAX_SCHEMA_CHARS}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                text, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise RequestError(f"{field}: {_short(exc)}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise RequestError(f"{field}: unsupported or invalid schema ({_short(error)})")
        first = np.frombuffer(llguidance.LLMatcher(self.tokenizer, grammar).compute_bitmask(),
                              dtype=np.uint8)
        first = np.unpackbits(first, bitorder="little")[: len(self._text_tokens)]
        if not (first.astype(bool) & self._text_tokens).any():
            raise RequestError(f"{field}: this model's vocabulary cannot write JSON")
        return Grammar(grammar, self.tokenizer)


def _short(message: Any) -> str:
    return " ".join(str(message).split())[:300]


class _Tokens:
    """What ``llguidance.TokenizerWrapper`` reads: each token's bytes, EOS, a tokenize
    function. Token bytes come from the vocabulary itself: llguidance's own reading of a
    ``tokenizer.json`` takes byte-level tokens for text when the decoder is a
    ``Sequence`` (as transformers saves SmolLM2's), which lets control bytes into JSON
    strings."""

    def __init__(self, hf_tokenizer: Any, eos: int) -> None:
        self._tok = hf_tokenizer
        self.eos_token_id = eos
        self.bos_token_id = getattr(hf_tokenizer, "bos_token_id", None)
        self.special_token_ids = sorted(set(hf_tokenizer.all_special_ids))
        self.tokens = token_bytes(hf_tokenizer)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tok.encode(text, add_special_tokens=False))


_BYTE_OF_CHAR: dict[str, int] | None = None


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable character → byte."""
    global _BYTE_OF_CHAR
    if _BYTE_OF_CHAR is None:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                     *range(ord("®"), ord("ÿ") + 1)]
        chars, extra = {}, 0
        for b in range(256):
            if b in printable:
                chars[chr(b)] = b
            else:
                chars[chr(256 + extra)] = b
                extra += 1
        _BYTE_OF_CHAR = chars
    return _BYTE_OF_CHAR


def _is_byte_level(hf_tokenizer: Any) -> bool:
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    state = json.loads(backend.to_str())
    return "ByteLevel" in json.dumps(state.get("pre_tokenizer"))


def token_bytes(hf_tokenizer: Any) -> list[bytes]:
    """The bytes each token id stands for (special tokens: their text).

    Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen) maps each byte to a printable
    character; SentencePiece writes a space as ``▁`` and raw bytes as ``<0xNN>``.
    """
    byte_level = _is_byte_level(hf_tokenizer)
    table = _byte_of_char()
    specials = set(hf_tokenizer.all_special_ids)
    pieces = hf_tokenizer.convert_ids_to_tokens(list(range(len(hf_tokenizer))))
    out = []
    for token_id, piece in enumerate(pieces):
        piece = piece or ""
        if token_id in specials:
            out.append(piece.encode("utf-8"))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif byte_level and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


_compilers: dict[int, tuple[Any, GrammarCompiler]] = {}  # the tokenizer kept: ids unique
_compilers_lock = threading.Lock()


def compiler_for(hf_tokenizer: Any, eos_ids: set[int] | frozenset[int]) -> GrammarCompiler:
    """The worker's compiler for ``hf_tokenizer`` (built on first use, then kept)."""
    with _compilers_lock:
        if id(hf_tokenizer) not in _compilers:
            log.info("building the grammar tokenizer (structured outputs)")
            _compilers[id(hf_tokenizer)] = (hf_tokenizer,
                                            GrammarCompiler(hf_tokenizer, eos_ids))
        return _compilers[id(hf_tokenizer)][1]
