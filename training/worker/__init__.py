"""Code that runs on a training worker: the attempt, the step, its cadence, evaluation,
checkpointing, the runtime and collectives seams."""
