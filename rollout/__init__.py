"""rollout package of R3RL."""
