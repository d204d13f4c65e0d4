"""Training one run: the lifelong trainer (`trainer`), its checkpoints
(`checkpoint`) and the cache of a frozen backbone's features (`feature_cache`).
Knows nothing of MLflow or the command line: it emits records to sinks."""
