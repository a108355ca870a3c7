"""What the kernel tests share: where they run, and the mark for the real (GPU-only) shapes."""

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_gpu = pytest.mark.skipif(
    not ON_GPU,
    reason="real shapes need a GPU; CPU runs small shapes under TRITON_INTERPRET=1")
