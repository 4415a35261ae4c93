"""Counting what Megatron's tensor-parallel collectives send per GPU (ring algorithms: an
all-reduce of N bytes sends 2(T-1)/T N, an all-gather or reduce-scatter of the full N (T-1)/T N),
split into the transformer layers' collectives and the rest (the embedding's all-reduce, the
output layer's gradient all-reduce, the vocab-parallel loss), so that the per-layer figure can be
held against the planner's prediction for one layer."""
from __future__ import annotations

import torch.distributed as dist


class CollectiveBytes:
    """While active, adds every TP collective's bytes to ``layers`` when it runs inside a
    transformer layer's forward or backward, else to ``outside``."""

    def __init__(self, layers) -> None:
        self.layers_bytes = self.outside_bytes = 0
        self._depth = 0  # > 0 while a layer's forward or backward runs
        self._layers = list(layers)

    def __enter__(self):
        import megatron.core.tensor_parallel.layers as layers
        import megatron.core.tensor_parallel.mappings as mappings

        self._saved = [(dist, "all_reduce", dist.all_reduce)] + [
            (m, name, getattr(m, name)) for m in (layers, mappings)
            for name in ("dist_all_gather_func", "dist_reduce_scatter_func")]
        for owner, name, fn in self._saved:
            setattr(owner, name, self._counting(fn, 2 if name == "all_reduce" else 1, name))
        self._hooks = [h for layer in self._layers for h in (
            layer.register_forward_pre_hook(self._forward_enters, with_kwargs=True),
            layer.register_forward_hook(self._forward_leaves))]
        return self

    # A layer's backward runs from the moment its output's gradient is complete until its input's
    # is: tensor hooks on both mark it (Megatron passes hidden_states by keyword, which module
    # backward hooks do not see).
    def _forward_enters(self, _layer, args, kwargs):
        self._depth += 1
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.requires_grad:
            hidden.register_hook(self._backward_leaves)

    def _forward_leaves(self, _layer, _args, output):
        self._depth -= 1
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(self._backward_enters)

    def _backward_enters(self, _grad):
        self._depth += 1

    def _backward_leaves(self, _grad):
        self._depth -= 1

    def _counting(self, fn, passes: int, name: str):
        def counted(*args, group=None, **kwargs):
            # the whole tensor: all-reduce's, all-gather's output (args[0]), reduce-scatter's input
            tensor = args[1] if name == "dist_reduce_scatter_func" else args[0]
            size = group.size() if group is not None else dist.get_world_size()
            if size > 1:
                sent = passes * tensor.numel() * tensor.element_size() * (size - 1) // size
                if self._depth > 0:
                    self.layers_bytes += sent
                else:
                    self.outside_bytes += sent
            return fn(*args, group=group, **kwargs)

        return counted

    def __exit__(self, *exc):
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)
        for h in self._hooks:
            h.remove()
