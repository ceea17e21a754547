"""Perplexity from the exact epoch loss: ``exp`` of the token mean over the whole set, never a mean of batch values.

A language model's perplexity on a set is ``exp(sum of the token losses / number of tokens)``. Averaging it per batch
is wrong twice: a batch's token mean weighted by anything but its token count is not the set's token mean, and
``exp`` is convex, so the mean of batch perplexities exceeds the perplexity of the set even with equal weights. The
mixin (``log_perplexity = True``) and ``validate(perplexity=True)`` take the epoch loss they already have exactly
(``sum / weight`` over every batch and process) and log its ``exp`` under ``PPL``.

Example:
    >>> import math
    >>> round(perplexity(math.log(20.0)), 9), perplexity(800.0), math.isnan(perplexity(float("nan")))
    (20.0, inf, True)

"""

from __future__ import annotations

import math

__all__ = ["PPL", "perplexity"]

#: The name perplexity is logged under: ``val/ppl``, ``validate()``'s ``"ppl"``.
PPL = "ppl"


def perplexity(loss: float) -> float:
    """``exp(loss)`` of an epoch's mean loss: ``inf`` past the largest float (``exp(710)``), ``nan`` for ``nan``."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
