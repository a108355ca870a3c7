"""Evaluation: FID and Inception Score (fid.py), the image sources they read (datasets.py), and the
CIFAR-10 classifier behind `ddpm-engine score` (classifier.py)."""
