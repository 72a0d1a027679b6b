"""actors package of R3RL."""
