"""Training one run. `trainer` is the lifelong trainer's loop; around it: `hooks` (which
strategy answers which hook), `position` (where training stands inside an experience),
`scoring` (every task's test set scored), `record` (what a run records), `nonfinite`
(the finite-loss check), `seeds` (the run's generators), `devices`, `checkpoint`,
`feature_cache` (a frozen backbone's features, computed once) and `preview` (the LR a run
will follow, through the trainer's own loop). Knows nothing of MLflow or the command line:
it emits records to sinks."""
