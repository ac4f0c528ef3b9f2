"""Dynamic shapes, in one place: the traffic mix a workload serves and the buckets that serve it.

- `traffic`: the mix (`--traffic` file or model.py `traffic()`), parsed and checked.
- `buckets`: the bucket set (`BucketSpec`), the plan's `shapes` section (`ShapePlan`), edges and axes.
- `bucketed`: `BucketedModel`, the dispatcher that serves any in-range shape through its buckets.
- `traffic_eval`: a traffic candidate's evaluation in a trial and the final's rounds of the mix.
- `shape_tuning`, `static`: the hooks the inference task calls (`shape_tuning_for`): buckets
  searched over a mix, or one input shape.
"""
