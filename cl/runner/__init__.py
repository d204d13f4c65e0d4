"""Running experiment files: `invocation` (every run and seed of a file under one
parent MLflow run), `sweep` (hyperparameter search over runs) and `pretrain`
(pre-training a backbone)."""
