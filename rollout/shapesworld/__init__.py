"""ShapesWorld: a verifiable GenEval-style world of simple shapes (tasks, splits, renderer).

Import the submodules directly (`rollout.shapesworld.tasks`, `rollout.shapesworld.render`);
the exact judge lives in `reward.shapes_judge`.
"""
