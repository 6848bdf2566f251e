"""Export targets (one module per backend), each a pass family with `emit` and `validate`."""
