"""elastic-trainer: fault-tolerant, elastic PyTorch training on Ray Train.

Six packages, each importing only from the ones listed after it (``tests/unit/test_layout.py``):
``driver`` (the CLI, launching Ray Train) -> ``worker`` (the attempt each Ray Train worker runs)
-> ``observability`` -> ``ray_internals`` (the one place Ray's private modules are used) ->
``tasks`` (the workload seam and the built-ins) -> ``core`` (config, sample order, checkpoint
format, run log, storage). docs/architecture.md has the module map.
"""

__version__ = "0.1.0"
