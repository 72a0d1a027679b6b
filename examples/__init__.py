"""Worked examples of tasks that plug into R3RL through its registries (see `rollout.plugins`).

The product packages (actors, learners, rollout, reward, cluster) never import this package; a
config loads an example with `plugins: [examples.<name>]`.
"""
