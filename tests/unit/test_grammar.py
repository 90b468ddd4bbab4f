"""Structured outputs in the engine, on a tiny random-weight LM with a byte-level
tokenizer: the grammar forces schema-valid JSON whatever the model prefers, the mask is
per sequence (a free request batched with a constrained one gives its lone output), EOS
comes only once the JSON is complete, a max_tokens cut is ``length``; and the schema
compiler refuses unsupported schemas naming the field."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.structured_outputs import SCHEMA
from serve.engine.core import Engine, EngineConfig
from serve.engine.grammar import GrammarCompiler, token_bytes
from serve.errors import RequestError
from serve.runtime.protocol import GenerationParams
from serve.runtime.step_lm_torch import TorchStepLM

EOS = 3


@pytest.fixture(scope="module")
def lm(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny["llama-bytes"])
    model = AutoModelForCausalLM.from_pretrained(tiny["llama-bytes"]).eval()
    return tokenizer, model, GrammarCompiler(tokenizer, {EOS})


async def _collect(seq) -> tuple[list[int], str | None]:
    tokens = []
    while True:
        event = await seq.queue.get()
        if event.error is not None:
            raise event.error
        if event.token is None:
            return tokens, event.finish_reason
        tokens.append(event.token)


def _run(model, requests: list[tuple[list[int], GenerationParams]]
         ) -> list[tuple[list[int], str | None]]:
    """Submit every request at once to one engine; their tokens and finish reasons."""
    engine = Engine(TorchStepLM(model, 1024), {EOS}, EngineConfig(max_running=32))

    async def main():
        seqs = [engine.submit(ids, params) for ids, params in requests]
        return await asyncio.gather(*(_collect(s) for s in seqs))
    try:
        return asyncio.run(main())
    finally:
        engine.close()


def _prompt(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def test_twenty_constrained_answers_all_validate(lm):
    tokenizer, model, compiler = lm
    grammar = compiler.json_schema("response_format", SCHEMA)
    requests = [(_prompt(tokenizer, f"user {i}: give me a profile"),
                 GenerationParams(max_new_tokens=600, temperature=0.0 if i % 2 else 1.0,
                                  seed=i, grammar=grammar)) for i in range(20)]
    results = _run(model, requests)
    reasons = [reason for _, reason in results]
    # strings and arrays are bounded, so the grammar ends every answer well within 600
    assert reasons == ["stop"] * 20
    answers = [json.loads(tokenizer.decode(tokens)) for tokens, _ in results]
    for answer in answers:
        jsonschema.validate(answer, SCHEMA)
    assert len({json.dumps(a) for a in answers}) > 1  # the model chose; the grammar bounded


def test_free_request_beside_a_constrained_one_gives_its_lone_output(lm):
    tokenizer, model, compiler = lm
    free = (_prompt(tokenizer, "the cat and the dog"), GenerationParams(max_new_tokens=40))
    constrained = (_prompt(tokenizer, "a profile"),
                   GenerationParams(max_new_tokens=40,
                                    grammar=compiler.json_schema("guided_json", SCHEMA)))
    [alone] = _run(model, [free])
    together = _run(model, [constrained, free, constrained])
    assert together[1] == alone
    assert alone[0] != together[0][0]  # the mask changed the constrained one
    assert tokenizer.decode(together[0][0]).startswith('{"name": "')


def test_max_tokens_cut_is_length_with_a_json_prefix(lm):
    tokenizer, model, compiler = lm
    grammar = compiler.json_schema("response_format", SCHEMA)
    [(tokens, reason)] = _run(model, [(_prompt(tokenizer, "a"),
                                       GenerationParams(max_new_tokens=5, grammar=grammar))])
    assert reason == "length" and len(tokens) == 5
    assert tokenizer.decode(tokens) == '{"nam'


def test_eos_only_where_the_json_is_complete(lm):
    tokenizer, _, compiler = lm
    matcher = compiler.json_schema("response_format", {"type": "object"}).matcher()
    for token in tokenizer("{}", add_special_tokens=False)["input_ids"]:
        assert not matcher.allowed()[EOS]
        matcher.accept(token)
    allowed = matcher.allowed()
    assert allowed[EOS] and allowed.sum() == 1
    # a wider logits row (padded vocabulary): the extra tokens are never allowed
    logits = np.zeros(len(tokenizer) + 7, dtype=np.float32)
    assert np.flatnonzero(np.isfinite(matcher.mask(logits))).tolist() == [EOS]


def test_json_object_gives_a_json_object(lm):
    tokenizer, model, compiler = lm
    grammar = compiler.json_schema("response_format", {"type": "object"})
    results = _run(model, [(_prompt(tokenizer, f"q{i}"),
                            GenerationParams(max_new_tokens=300, temperature=1.0, seed=i,
                                             grammar=grammar)) for i in range(4)])
    for tokens, reason in results:
        if reason == "stop":
            assert isinstance(json.loads(tokenizer.decode(tokens)), dict)
        else:
            assert tokenizer.decode(tokens).startswith("{")


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "object", "properties": {"a": {"type": "string", "format": "no-such"}}},
     "response_format.json_schema.schema: unsupported or invalid schema"),
    ({"type": "strnig"}, "response_format.json_schema.schema: unsupported or invalid"),
    (["not", "an", "object"], "response_format.json_schema.schema: must be a JSON schema"),
])
def test_unsupported_schema_is_refused_naming_the_field(lm, schema, message):
    _, _, compiler = lm
    with pytest.raises(RequestError) as info:
        compiler.json_schema("response_format.json_schema.schema", schema)
    assert info.value.status == 400 and str(info.value).startswith(message)


def test_token_bytes_undo_the_byte_level_alphabet(lm):
    tokenizer, _, _ = lm
    pieces = token_bytes(tokenizer)
    for text in ['{"a": 1}', "é\x1a\n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(pieces[i] for i in ids) == text.encode("utf-8")


def test_a_vocabulary_that_cannot_write_json_is_refused(tiny):
    """The word-level tiny Llama has no ``{``: a 400 naming the field, not garbage."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    with pytest.raises(RequestError) as info:
        GrammarCompiler(tokenizer, {EOS}).json_schema("response_format", {"type": "object"})
    assert str(info.value) == "response_format: this model's vocabulary cannot write JSON"


def test_a_refused_token_ends_only_that_output(lm):
    tokenizer, _, compiler = lm
    matcher = compiler.json_schema("response_format", {"type": "object"}).matcher()
    matcher.accept(tokenizer.convert_tokens_to_ids("x"))  # not JSON: the matcher fails
    assert np.flatnonzero(matcher.allowed()).tolist() == [EOS]
