"""Structured width pruning (LLM-Pruner): coupled groups, importance, slicing, export, LoRA recovery."""
