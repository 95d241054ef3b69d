"""Agreement metrics and the negative-sample rule.

ROUGE-L F1 follows ``rouge-score`` (Lin 2004; the scorer most KV-compression papers use): lower-case,
non-alphanumerics become spaces, whitespace tokens, no stemming, F-measure with beta = 1. The LCS uses
the bit-parallel algorithm of Crochemore et al. (2001), so thousands of 500-word pairs take well under a
second in pure Python.

Negative samples follow Gao et al., "Rethinking Key-Value Cache Compression Techniques for Large
Language Model Serving" (MLSys 2025), artifact ``3_neg_samples/0_neg_extractor.py``
(``compare_json_files_by_difference``, ``min_difference = 10/100``): a sample counts only when its
full-cache score is at least the mean full-cache score of the set, and it is negative when the compressed
score is not above ``(1 - 0.10) x`` the full-cache score. Without reference answers the full-cache answer
is the reference (score 1 for every prompt), so the rule reduces to ROUGE-L(compressed, full) <= 0.9.
"""

from __future__ import annotations

import re

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (bit-parallel, O(len(a) * len(b) / wordsize))."""
    if not a or not b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of ``candidate`` against ``reference`` (1.0 when both are empty)."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    if not c and not r:
        return 1.0
    if not c or not r:
        return 0.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


NEGATIVE_MIN_DIFFERENCE = 0.10


def negative_flags(full_scores: list[float], comp_scores: list[float],
                   min_difference: float = NEGATIVE_MIN_DIFFERENCE) -> tuple[list[bool], list[bool]]:
    """Per sample: (eligible, negative) under Gao et al.'s rule (see module docstring)."""
    if not full_scores:
        return [], []
    mean = sum(full_scores) / len(full_scores)
    eligible = [f >= mean - 1e-12 for f in full_scores]
    negative = [e and not (f * (1 - min_difference) < c) for e, f, c in zip(eligible, full_scores, comp_scores)]
    return eligible, negative
