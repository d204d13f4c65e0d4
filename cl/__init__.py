"""The continual-learning lab: lifelong trainer, models, config and registry, CLI, tracking, checkpoints."""
__version__ = "0.1.0"
