"""Evaluation of quantized models against their floating-point originals."""

from quant.evaluation.agreement import AgreementResult, EmbeddingSimilarity, embedding_similarity, fp_agreement
from quant.evaluation.perplexity import PerplexityResult, perplexity
from quant.evaluation.size import SizeReport, model_size_bytes, size_report

__all__ = [
    "AgreementResult",
    "EmbeddingSimilarity",
    "PerplexityResult",
    "SizeReport",
    "embedding_similarity",
    "fp_agreement",
    "model_size_bytes",
    "perplexity",
    "size_report",
]
