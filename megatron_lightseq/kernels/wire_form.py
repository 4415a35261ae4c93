"""The numbers of the int8 wire form that the torch code (kv_wire.py) and the Triton kernels
(triton_wire.py) share: one place, so that both give the same bytes."""
import torch

SCALE_DTYPE = torch.float32  # the scales' dtype on the wire
QMAX = 127.0  # symmetric int8: -127..127 (-128 unused)
TINY = torch.finfo(torch.float32).tiny  # a zero amax: the scale stays positive, q = 0
