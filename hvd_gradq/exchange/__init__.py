"""The exchange: the collectives behind one protocol and the in-process world (``collectives``),
the exchanges that move one layer's bytes (``exchanges``), every residual of a rank
(``residuals``), the engine that codes and decodes (``engine``), the reallocation step
(``reallocation``) and the checkpoint bundle (``state``). No Horovod here: a job passes Horovod's
collectives in, the simulation its in-process world."""
