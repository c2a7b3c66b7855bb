"""The Hydra training app's components (`pip install adaptive-sparse[train]`): data and tasks, the
training step, metering, optimisation, checkpoints, torchrun, the run's lifecycle and its records.
train.py at the project's root composes them."""
