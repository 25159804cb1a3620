"""Registered corpora: deterministic disjoint splits, seeded calibration windows, consecutive held-out windows."""

from __future__ import annotations

import pytest
import torch

from quant.calibration.corpus import (
    Corpus,
    UnknownCorpus,
    build_calibration,
    build_eval_data,
    get_corpus,
    is_held_out,
    list_corpora,
    register_corpus,
)
from quant.recipes.schema import CalibrationSpec, EvaluationSpec


class CharTokenizer:
    """One token per character (code point), optional BOS -- enough to decode windows back to text."""

    def __init__(self, bos: int | None = None, eos: int | None = None) -> None:
        self.bos = bos
        self.eos_token_id = eos

    def __call__(self, text, add_special_tokens: bool = True, verbose: bool = True):
        def enc(t: str) -> list[int]:
            ids = [ord(c) for c in t]
            return ([self.bos] if add_special_tokens and self.bos is not None else []) + ids

        return {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)}


def _decode(row: torch.Tensor) -> str:
    return "".join(chr(int(i)) for i in row)


def test_default_is_python_docs_and_unknown_corpus_is_named() -> None:
    assert {"default", "python-docs"} <= set(list_corpora())
    assert get_corpus("default") is get_corpus("python-docs")
    with pytest.raises(UnknownCorpus, match="'no-such-corpus'.*python-docs"):
        get_corpus("no-such-corpus")
    with pytest.raises(UnknownCorpus):
        build_calibration(CharTokenizer(), CalibrationSpec(source="no-such-corpus", num_samples=1, seq_len=16))


def test_vendored_corpus_splits_are_disjoint_deterministic_and_complete() -> None:
    corpus = get_corpus("python-docs")
    docs = corpus.documents()
    assert len(docs) > 400 and sum(len(t) for _, t in docs) > 5_000_000
    cal, ev = corpus.split("calibration"), corpus.split("evaluation")
    cal_ids, ev_ids = {d for d, _ in cal}, {d for d, _ in ev}
    assert not cal_ids & ev_ids
    assert cal_ids | ev_ids == {d for d, _ in docs}
    assert 0.05 < len(ev) / len(docs) < 0.2
    assert all(is_held_out(d, corpus.eval_fraction) for d in ev_ids)
    assert corpus.split("evaluation") == ev  # same split every call
    sample = cal[0][1]
    assert "::" not in sample and ">>>" not in sample  # cleaned: no literal-block or doctest markers


def test_calibration_windows_are_seeded_random_and_from_the_calibration_split() -> None:
    tok = CharTokenizer(bos=1, eos=2)
    spec = CalibrationSpec(num_samples=6, seq_len=64, seed=3, batch_size=2)
    data = build_calibration(tok, spec)
    assert data.input_ids.shape == (6, 64) and data.input_ids.dtype == torch.long
    assert data.batch_size == 2
    assert torch.all(data.input_ids[:, 0] == 1)  # the tokenizer's BOS opens every window
    assert torch.equal(data.input_ids, build_calibration(tok, spec).input_ids)
    other = build_calibration(tok, spec.model_copy(update={"seed": 4}))
    assert not torch.equal(data.input_ids, other.input_ids)

    corpus = get_corpus("default")
    cal_text = "\x02".join(t for _, t in corpus.split("calibration"))
    ev_text = "\x02".join(t for _, t in corpus.split("evaluation"))
    for row in data.input_ids:
        piece = _decode(row[1:]).split("\x02")[0]
        if len(piece) >= 40:
            assert piece in cal_text and piece not in ev_text


def test_eval_windows_are_consecutive_non_overlapping_and_held_out() -> None:
    tok = CharTokenizer(bos=None, eos=None)
    data = build_eval_data(tok, EvaluationSpec(num_samples=5, seq_len=100))
    assert data.input_ids.shape == (5, 100)
    joined = "".join(_decode(row) for row in data.input_ids)
    first_doc = get_corpus("default").split("evaluation")[0][1]
    assert first_doc.startswith(joined)  # consecutive windows from the start of the held-out split
    assert torch.equal(data.input_ids, build_eval_data(tok, EvaluationSpec(num_samples=5, seq_len=100)).input_ids)
    # a request larger than the held-out split returns every full window it has, no more
    big = build_eval_data(CharTokenizer(), EvaluationSpec(num_samples=4096, seq_len=512))
    held_out_chars = sum(len(t) for _, t in get_corpus("default").split("evaluation"))
    assert big.num_samples == held_out_chars // 512


def test_hf_tokenizer_special_tokens_wrap_each_window() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    text = [t for _, t in get_corpus("default").split("calibration")[:20]]
    raw.train_from_iterator(text, trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", raw.token_to_id("[CLS]")), ("[SEP]", raw.token_to_id("[SEP]"))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    cls, sep = tok.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    for data in (
        build_calibration(tok, CalibrationSpec(num_samples=3, seq_len=32)),
        build_eval_data(tok, EvaluationSpec(num_samples=3, seq_len=32)),
    ):
        assert data.input_ids.shape == (3, 32)
        assert torch.all(data.input_ids[:, 0] == cls) and torch.all(data.input_ids[:, -1] == sep)
        assert not torch.any(data.input_ids[:, 1:-1] == cls)


def test_registering_a_corpus_and_too_short_splits() -> None:
    docs = [(f"doc{i}", "word " * 30) for i in range(40)]
    corpus = Corpus(name="test-tiny", description="synthetic", license="CC0-1.0", load=lambda: docs, eval_fraction=0.3)
    register_corpus(corpus, replace=True)
    with pytest.raises(ValueError, match="already registered"):
        register_corpus(corpus)
    with pytest.raises(ValueError, match="alias"):
        register_corpus(Corpus(name="default", description="", license="", load=lambda: docs))
    data = build_eval_data(CharTokenizer(), EvaluationSpec(corpus="test-tiny", num_samples=2, seq_len=16))
    assert data.input_ids.shape == (2, 16)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        build_calibration(CharTokenizer(), CalibrationSpec(source="test-tiny", num_samples=1, seq_len=16384))
