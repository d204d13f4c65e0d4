"""The continual-learning lab: lifelong trainer, models, config and registry, CLI, tracking, checkpoints.

`cl.run(file_or_dict)` runs an experiment and returns its results; `cl.load(...)` checks one
without running it (see `cl.api`). They are imported on first use, so `import cl` stays light.
"""
__version__ = "0.1.0"
__all__ = ["load", "run"]


def __getattr__(name: str):
    if name in __all__:
        from cl import api

        return getattr(api, name)
    raise AttributeError(f"module 'cl' has no attribute '{name}'")
