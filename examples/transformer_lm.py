"""Small causal Transformer language model on Jane Austen's novels, data-parallel, with hvd_gradq.

    horovodrun -np 2 -H localhost:2 python examples/transformer_lm.py --compressor qsgd --bits 4
    python examples/transformer_lm.py --workers 4 --compressor shared_scale --allocator lad --budget 3

The point of this example is *which layer types receive bits*: token embedding, attention
(in/out projections), feed-forward (linear1/linear2), norms, decoder. With ``--allocator`` the
JSON log's ``codebooks`` hold the bits per layer at every codebook version and ``layer_types``
the type of every layer (``hvd_gradq.alloc.layer_types``). Model:
``workloads.models.TransformerLanguageModel`` (3.0M parameters at the defaults, pre-norm blocks,
learned positions, context = --bptt). Data as in examples/austen_lstm_lm.py. Training: SGD
(lr 5) with the gradient norm clipped at 0.25 after the exchange. Not Adam: the LAD metric
prices an SGD step, and Adam's per-element normalisation turns the noise of the 1-bit codes the
allocator gives large layers into full-size updates (measured here: 4 simulated workers, LAD at a
3-bit budget, validation perplexity 3220 after 45 steps with Adam lr 1e-3, against 454 for
float32 after 60; with SGD lr 5 it trains: 845 against 348 after 120 steps).
"""
from __future__ import annotations

import argparse

import torch

from common import add_arguments, add_language_model_arguments, language_model_task, run
from workloads.tasks import TASKS

TRANSFORMER = TASKS["transformer"]  # TransformerLanguageModel on Jane Austen's novels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, bits=4, lr=5.0, batch_size=16, epochs=1)
    add_language_model_arguments(p)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=0.25)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)

    def make_task(a):
        model = TRANSFORMER.model(vocab=a.vocab, dim=a.dim, heads=a.heads, layers=a.layers, ffn=a.ffn,
                                  context=a.bptt, dropout=a.dropout)
        return language_model_task(a, TRANSFORMER, model, lambda m: torch.optim.SGD(m.parameters(), lr=a.lr),
                                   a.clip)

    return run(make_task, args)


if __name__ == "__main__":
    main()
