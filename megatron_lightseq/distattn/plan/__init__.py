"""The plan: which rank computes which block at which step and what travels, as data. Pure
Python (and numpy): no process group, nothing runs. Built per rank (``build_plan(..., rank=r)``)
for a running rank, whole for the checks and describe()."""
