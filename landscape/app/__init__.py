"""The application layer over the analyzers: the demo (train AdamW and Nexus, compare at matched training
loss, publish a report), its HTML report builder, the exact toys and reading training runs back.
Unlike the analyzers it uses the trainer (nexus_opt.train, checkpoints, suites)."""
