"""Registered offline text corpora for calibration and held-out evaluation.

Every corpus is a list of documents ``(doc_id, text)`` that installs with the project (vendored under
``quant/data/``) or with a package. Each is split deterministically, by document, into a calibration
part and a held-out evaluation part: a document is held out when the SHA-256 of its id falls in the
first ``eval_fraction`` of the hash range, so the split never depends on file order and the two parts
share no text.

* :func:`build_calibration` -- ``num_samples`` windows of ``seq_len`` tokens at seeded random offsets
  of the calibration part (documents in a seeded random order, separated by the EOS token when the
  tokenizer has one).
* :func:`build_eval_data` -- consecutive non-overlapping ``seq_len`` windows of the held-out part
  (documents sorted by id), the same for every call and every seed.

Windows carry the tokenizer's own special tokens (``<s>`` for LLaMA-style tokenizers, ``[CLS] ... [SEP]``
for BERT), counted inside ``seq_len``.

Registered corpora (``default`` is an alias of ``python-docs``):

``python-docs``
    English prose of the Python 3.11 documentation (Debian ``python3.11-doc``), reduced to paragraphs by
    ``scripts/build_corpus.py``; PSF License Agreement v2 (``quant/data/PYTHON_DOCS_LICENSE``). About
    6.4 million characters in 455 documents, 10% of them held out.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from quant.calibration.data import CalibrationData
from quant.recipes.schema import CalibrationSpec, EvaluationSpec

Split = Literal["calibration", "evaluation"]
Document = tuple[str, str]

DEFAULT_CORPUS = "python-docs"
#: documents tokenized per tokenizer call (fast tokenizers batch them in native code)
_TOKENIZE_BATCH = 16


class UnknownCorpus(ValueError):
    """The requested corpus name is not registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"unknown corpus {name!r}; registered corpora: {', '.join(known)}")


@dataclass(frozen=True)
class Corpus:
    """A named offline corpus: where its documents come from and how much of it is held out."""

    name: str
    description: str
    license: str
    load: Callable[[], list[Document]] = field(repr=False, compare=False)
    eval_fraction: float = 0.1

    def documents(self) -> list[Document]:
        return _cached_documents(self)

    def split(self, part: Split) -> list[Document]:
        """The calibration or held-out documents, sorted by id."""
        held_out = part == "evaluation"
        return [d for d in self.documents() if is_held_out(d[0], self.eval_fraction) == held_out]


def is_held_out(doc_id: str, eval_fraction: float) -> bool:
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


@lru_cache(maxsize=4)
def _cached_documents(corpus: Corpus) -> list[Document]:
    docs = sorted(corpus.load())
    if not docs:
        raise ValueError(f"corpus {corpus.name!r} has no documents")
    return docs


# ------------------------------------------------------------------------------------ registry
_CORPORA: dict[str, Corpus] = {}
_ALIASES: dict[str, str] = {"default": DEFAULT_CORPUS}


def register_corpus(corpus: Corpus, replace: bool = False) -> None:
    if corpus.name in _ALIASES:
        raise ValueError(f"{corpus.name!r} is an alias and cannot name a corpus")
    if corpus.name in _CORPORA and not replace:
        raise ValueError(f"corpus {corpus.name!r} is already registered")
    _CORPORA[corpus.name] = corpus


def list_corpora() -> list[str]:
    """Registered corpus names and aliases."""
    return sorted([*_CORPORA, *_ALIASES])


def get_corpus(name: str) -> Corpus:
    key = _ALIASES.get(name, name)
    try:
        return _CORPORA[key]
    except KeyError:
        raise UnknownCorpus(name, list_corpora()) from None


def read_jsonl_gz(path: Path | Any) -> list[Document]:
    """Documents of a gzip'd JSON-lines file with ``id`` and ``text`` per line."""
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        return [(rec["id"], rec["text"]) for rec in map(json.loads, fh) if rec.get("text")]


def _python_docs() -> list[Document]:
    return read_jsonl_gz(resources.files("quant") / "data" / "python_docs.jsonl.gz")


register_corpus(
    Corpus(
        name="python-docs",
        description="English prose of the Python 3.11 documentation (Debian python3.11-doc), code removed",
        license="PSF-2.0",
        load=_python_docs,
    )
)


# ------------------------------------------------------------------------------------ tokenization
@dataclass(frozen=True)
class _Specials:
    prefix: list[int]
    suffix: list[int]
    separator: list[int]


def _special_tokens(tokenizer: Any) -> _Specials:
    """The ids the tokenizer adds around a text (found by difference), and the document separator."""
    plain = list(tokenizer("hello", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("hello")["input_ids"])
    prefix: list[int] = []
    suffix: list[int] = []
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain) :]
            break
    eos = getattr(tokenizer, "eos_token_id", None)
    return _Specials(prefix=prefix, suffix=suffix, separator=[int(eos)] if eos is not None else [])


def _token_stream(tokenizer: Any, docs: list[Document], specials: _Specials, needed: int | None) -> list[int]:
    """Concatenated token ids of ``docs`` (separator between documents), stopping once ``needed`` are in."""
    stream: list[int] = []
    for start in range(0, len(docs), _TOKENIZE_BATCH):
        texts = [text for _, text in docs[start : start + _TOKENIZE_BATCH]]
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(int(i) for i in ids)
            stream.extend(specials.separator)
        if needed is not None and len(stream) >= needed:
            break
    return stream


def _windows(chunks: list[list[int]], specials: _Specials) -> torch.Tensor:
    rows = [specials.prefix + chunk + specials.suffix for chunk in chunks]
    return torch.tensor(rows, dtype=torch.long)


def _content_len(seq_len: int, specials: _Specials) -> int:
    n = seq_len - len(specials.prefix) - len(specials.suffix)
    if n < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for text next to the tokenizer's special tokens")
    return n


# ------------------------------------------------------------------------------------ public API
def build_calibration(tokenizer: Any, spec: CalibrationSpec) -> CalibrationData:
    """``spec.num_samples`` windows of ``spec.seq_len`` tokens at seeded random offsets of the calibration split."""
    corpus = get_corpus(spec.source)
    specials = _special_tokens(tokenizer)
    length = _content_len(spec.seq_len, specials)
    rng = random.Random(spec.seed)
    docs = corpus.split("calibration")
    rng.shuffle(docs)
    # enough text that windows rarely overlap: four times what the windows cover, or the whole split
    stream = _token_stream(tokenizer, docs, specials, needed=4 * spec.num_samples * length + length)
    if len(stream) < length:
        raise ValueError(
            f"corpus {corpus.name!r} calibration split has {len(stream)} tokens, fewer than seq_len {spec.seq_len}"
        )
    starts = [rng.randrange(0, len(stream) - length + 1) for _ in range(spec.num_samples)]
    ids = _windows([stream[s : s + length] for s in starts], specials)
    return CalibrationData(input_ids=ids, attention_mask=None, batch_size=spec.batch_size)


def build_eval_data(tokenizer: Any, spec: EvaluationSpec, batch_size: int = 4) -> CalibrationData:
    """Consecutive non-overlapping ``spec.seq_len`` windows of the held-out split, from its start.

    When the held-out split is shorter than ``num_samples`` windows, every full window it has is returned.
    """
    corpus = get_corpus(spec.corpus)
    specials = _special_tokens(tokenizer)
    length = _content_len(spec.seq_len, specials)
    stream = _token_stream(tokenizer, corpus.split("evaluation"), specials, needed=spec.num_samples * length)
    count = min(spec.num_samples, len(stream) // length)
    if count == 0:
        raise ValueError(
            f"corpus {corpus.name!r} held-out split has {len(stream)} tokens, fewer than seq_len {spec.seq_len}"
        )
    ids = _windows([stream[i * length : (i + 1) * length] for i in range(count)], specials)
    return CalibrationData(input_ids=ids, attention_mask=None, batch_size=batch_size)
