"""Experiment scripts: one run (`python -m experiments.run`), configs in experiments/configs/."""
