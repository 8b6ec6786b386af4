"""hiad_train: the PyTorch training stage of hiad-deploy (datasets, tasks, detectors, evaluation)."""

__version__ = "0.1.0"
