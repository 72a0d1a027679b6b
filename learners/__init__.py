"""learners package of R3RL."""
