"""Deep Mutual Learning for cohorts of neural networks, driven by Hydra configs."""

__version__ = "0.1.0"
