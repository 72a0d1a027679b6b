"""cluster package of R3RL."""
