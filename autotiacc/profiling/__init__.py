"""Profiling: where a forward's time goes, and which layers can be lowered. Nothing here imports
torch at package import, nor engine/, inference/ or training/ (they sit above it).

- `schema`: profile.json (its fields, reading, writing, the terminal summary).
- `forward`: the per-module profile of one forward (`profile_model`, `profile_workload`).
- `attribution`, `gpu`, `diagnosis`: per-module time from torch.profiler, GPU counters and
  peaks, and the diagnosis that orders the search.
- `groups`: the candidate groups for per-layer precision.
- `sensitivity`: the per-layer sensitivity pass over those groups.
- `search`: the profiling step, one entry point (`run_profile`) for `autotiacc profile` and the tune.
- `cache`: profiles reused across runs of the same workload on the same machine.
"""
