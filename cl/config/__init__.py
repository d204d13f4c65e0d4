"""Reading an experiment file into a run's components.

`schema` validates the YAML into typed objects; `registry` finds a component by
name, `module:Class` path or entry point; `models` and `components` build the
model, stream, strategies and optimizer a run trains with.
"""
