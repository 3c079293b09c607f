"""MoCo's InfoNCE written out term by term, the reference the losses and the server are checked against."""
from __future__ import annotations

import math


def reference_info_nce(
    queries: list[list[float]], keys: list[list[float]], negatives: list[list[float]], temperature: float
) -> tuple[float, float]:
    """InfoNCE written out per row: -log(exp(q.k/T) / (exp(q.k/T) + sum_j exp(q.n_j/T))), and top-1 accuracy."""
    losses, hits = [], []
    for query, key in zip(queries, keys):
        query_unit, key_unit = unit(query), unit(key)
        positive = dot(query_unit, key_unit) / temperature
        negative_logits = [dot(query_unit, negative) / temperature for negative in negatives]
        denominator = math.exp(positive) + sum(math.exp(logit) for logit in negative_logits)
        losses.append(-math.log(math.exp(positive) / denominator))
        hits.append(1.0 if all(positive > logit for logit in negative_logits) else 0.0)
    return sum(losses) / len(losses), sum(hits) / len(hits)


def unit(vector: list[float]) -> list[float]:
    """The vector divided by its Euclidean length."""
    length = math.sqrt(sum(value * value for value in vector))
    return [value / length for value in vector]


def dot(a: list[float], b: list[float]) -> float:
    """Plain dot product."""
    return sum(x * y for x, y in zip(a, b))
