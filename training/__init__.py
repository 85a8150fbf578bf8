"""elastic-trainer: fault-tolerant, elastic PyTorch DDP training on Ray Train.

Read top to bottom: cli -> driver (TorchTrainer) -> loop (per-worker DDP) -> models, data,
checkpoint, chaos -> config, storage, runlog, metrics.
"""

__version__ = "0.1.0"
