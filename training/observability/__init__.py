"""What a person watches: Ray metrics, plots of the run log, the pace line."""
