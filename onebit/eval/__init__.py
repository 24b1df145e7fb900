"""Evaluation: speed benchmarks against the roofline and peer engines (``onebit.eval.bench``)."""
