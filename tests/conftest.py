"""Suite-wide settings."""

import torch

# The test models are tiny: one intra-op thread is as fast as two when the machine is idle, and keeps the suite
# from slowing down ~10x (OpenMP threads spinning against each other) when another process is using the cores.
torch.set_num_threads(1)
