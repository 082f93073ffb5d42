"""Planning: the cost model of the transports (``cost_model``) and the per-layer ``Planner``
(codec, transport and predicted cost of every layer, and its codebook entry). Pure: no Horovod."""
