"""Evaluation of learned features: kNN, linear and semi-supervised probes, MocoSFL's protocol."""
