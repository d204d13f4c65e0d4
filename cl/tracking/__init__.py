"""Where records go: the append-only `journal` of every MLflow run, the `sink` the
trainer writes to, the `deliverer` that sends journals to the `store` (on a thread,
or in the `delivery` child process), `sync` for what waits, `browse` for reading
runs back, and `provenance` (what code and data a run used)."""
