"""Running experiment files: `one_run` (a configuration and a stream in, a record and
its result out), `invocation` (every run and seed of a file under one parent MLflow
run), `sweep` (hyperparameter search over runs) and `pretrain` (pre-training a backbone,
itself a run)."""
