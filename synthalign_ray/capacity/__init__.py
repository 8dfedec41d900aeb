"""Capacity questions about a run before it runs: `plan` splits GPUs across the stages, `simulate` runs the
driver on made-up rows with sleeping stages, `calibrate` measures each stage alone."""
