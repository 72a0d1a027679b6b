"""reward package of R3RL."""
