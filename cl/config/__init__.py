"""Reading an experiment file into a run's components.

`files` reads the YAML (and `--set` overrides) into the typed objects of `schema`;
`validation` resolves every component and checks its arguments (`arguments`)
before anything runs, and `errors` words what is wrong. `registry` finds a
component by name, `module:Class` path or entry point; `models` and
`components` build the model, stream, strategies and optimizer a run trains
with; `params` flattens a config into MLflow params.
"""
