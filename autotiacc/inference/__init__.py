"""The inference task: workload formats, candidate build and evaluation, per-layer precision,
dynamic shapes (buckets, traffic), plans, artifacts and verification, and the tuner (`task.tune`).

Nothing is imported here, so that `import autotiacc` stays light.
"""
