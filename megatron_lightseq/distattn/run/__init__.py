"""Running a call on one rank: the executor, the all-to-all, the pipeline and its autograd Function, emulation, the memory model."""
