"""Measuring tasks against each other: gradient geometry, lookahead affinity and task clusters,
Δm against single-task baselines with bootstrap intervals, and the commands that train runs to
measure them (affinity, compare)."""
