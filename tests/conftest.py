import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be enabled before triton
# decorates the kernels, i.e. before rlsd_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
