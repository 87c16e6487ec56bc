"""Shared pieces: sequence tensors, model loading, tokenizer checks, KL controllers."""
