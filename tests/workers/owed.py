"""What one rank's drop-in still owes, as one flat vector over the layers (for the workers that
check error feedback's conservation against plain Horovod): every residual kind of the engine,
the two-phase server residual placed at this rank's chunk, and what a change of coding carried.
(Low-rank layers keep theirs in their factored layout; their conservation is tested in
tests/test_simulate.py.)"""
import torch


def owed(exchange, named) -> torch.Tensor:
    res, parts = exchange.residuals, []
    for n, p in named:
        v = torch.zeros(p.numel())
        for store in (res.worker, res.zero_bit, res.lanes):
            if n in store.residuals:
                v += store.residuals[n].reshape(-1)
        coder = exchange.coders.get(n)
        if n in res.server.residuals and coder is not None:
            v[coder.bounds[coder.rank]:coder.bounds[coder.rank + 1]] += res.server.residuals[n]
        if n in res.carry:
            v += res.carry[n].reshape(-1)
        parts.append(v)
    return torch.cat(parts)
