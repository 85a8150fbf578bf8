"""Code that runs where the user typed the command: the CLI, launching Ray Train, the run lease."""
