"""Pure pieces every side uses: the configuration schema, the sample order, checkpoint format, run
log, storage, stops, the save protocol. Imports nothing else from training."""
