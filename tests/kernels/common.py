"""What the kernel tests share: where they run (real shapes are marked `gpu`, see the root conftest)."""

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
