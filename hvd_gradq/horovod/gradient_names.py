"""Which layer a bare gradient belongs to: Horovod hands a ``Compressor`` the gradient tensor
only (no name, no step), so the compressor finds it among the model's parameters: by identity with
``p.grad`` (searched from the last hit backwards, the order backward produces them), or for a
dense copy of a sparse gradient (Horovod's ``sparse_as_dense=True``) by shape and value."""
from __future__ import annotations

import torch


class GradientNames:
    """The names of ``params`` (``(name, parameter)`` pairs) for the gradients handed over;
    ``label`` is what error messages call the owner."""

    def __init__(self, params: list[tuple[str, torch.Tensor]], label: str) -> None:
        self._params = params
        self._by_name = dict(params)
        self.label = label
        self._index = {n: i for i, (n, _) in enumerate(params)}
        self._cursor = 0  # where the last gradient was found; backward visits layers in order
        self._grad_names: dict[int, str] = {}
        #: layers found by their sparse gradient (sparse_as_dense=True) this step
        self._densified: set[str] = set()

    def clear(self) -> None:
        """A new step: sparse layers may be found by their dense copy again."""
        self._densified.clear()

    def name_of(self, grad: torch.Tensor) -> str:
        name = self._grad_names.get(id(grad))
        if name is not None and self._params[self._index[name]][1].grad is grad:
            return name
        count = len(self._params)
        for k in range(count):  # search backwards from the last hit: gradients arrive in reverse
            i = (self._cursor - 1 - k) % count
            pname, p = self._params[i]
            if p.grad is grad:
                self._cursor = i
                self._grad_names[id(grad)] = pname
                return pname
        name = self._densified_name(grad)
        if name is not None:
            return name
        if any(p is grad for _, p in self._params):
            raise ValueError(
                f"{self.label} was given a parameter instead of its gradient: that is hvd.DistributedOptimizer "
                "with op=hvd.Adasum, whose reduction is not a sum of codes. Use op=hvd.Average or op=hvd.Sum (the "
                "same in the optimizer and the compressor)."
            )
        raise ValueError(
            f"{self.label} was given a tensor of shape {tuple(grad.shape)} that is not the gradient of any "
            "parameter in its named_parameters. Pass the same model's named_parameters() to the compressor and "
            "to hvd.DistributedOptimizer; the compressor cannot be used with hvd.allreduce on arbitrary tensors."
        )

    def _densified_name(self, dense: torch.Tensor) -> str | None:
        """The layer whose sparse gradient ``dense`` is a dense copy of (Horovod's
        ``sparse_as_dense=True`` hands ``compress`` ``p.grad.to_dense()``, not ``p.grad``)."""
        found = [n for n, p in self._params if p.grad is not None and p.grad.is_sparse
                 and p.grad.shape == dense.shape and n not in self._densified]
        if len(found) > 1:  # several sparse layers of this shape: the one with these values
            found = [n for n in found if torch.equal(self._by_name[n].grad.to_dense(), dense)]
        if len(found) > 1:
            raise ValueError(
                f"{self.label}: the sparse gradients of {found} are equal this step, so the dense copy Horovod "
                "made (sparse_as_dense=True) cannot be told apart; build these layers with sparse=False"
            )
        if not found:
            return None
        self._densified.add(found[0])
        return found[0]
