"""Profiling that adds up: per-module time from torch.profiler's attribution (`attribution`),
GPU counters and peaks (`gpu`), and the diagnosis that orders the search (`diagnosis`).
Nothing here imports torch at package import."""
