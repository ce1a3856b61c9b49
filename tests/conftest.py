import torch

# The unit tests use tiny tensors: on a 2-core machine one intra-op thread is faster and steadier
# (this replaces per-module fixtures that did the same).
torch.set_num_threads(1)
