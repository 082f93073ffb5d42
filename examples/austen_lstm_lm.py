"""Word-level LSTM language model on Jane Austen's six novels, data-parallel, with hvd_gradq.

    horovodrun -np 2 -H localhost:2 python examples/austen_lstm_lm.py --compressor qsgd --bits 3
    python examples/austen_lstm_lm.py --workers 4 --compressor shared_scale --allocator lad --budget 3

Model: embedding, 2-layer LSTM, linear decoder (``workloads.models.LSTMLanguageModel``; 11.4M
parameters at --emb 256 --hidden 512, the communication-bound case; most of them in the
embedding and the decoder). Data: Debian's r-cran-janeaustenr, read without R
(``workloads.datasets.austen_lm``): about 877k tokens, the first 90% for training, the next 5%
validation, the last 5% test; vocabulary: the --vocab most frequent training tokens. Training:
SGD (lr 20, the classic setting for this model family) with the gradient norm clipped at 0.25
after the exchange; the headline metric is the validation perplexity.
"""
from __future__ import annotations

import argparse

import torch

from common import add_arguments, add_language_model_arguments, language_model_task, run
from workloads.tasks import TASKS

LSTM = TASKS["lstm"]  # LSTMLanguageModel on Jane Austen's novels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, bits=3, lr=20.0, batch_size=20, epochs=1)
    add_language_model_arguments(p)
    p.add_argument("--emb", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--clip", type=float, default=0.25)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)

    def make_task(a):
        model = LSTM.model(vocab=a.vocab, emb=a.emb, hidden=a.hidden, layers=a.layers, dropout=a.dropout)
        return language_model_task(a, LSTM, model, lambda m: torch.optim.SGD(m.parameters(), lr=a.lr), a.clip)

    return run(make_task, args)


if __name__ == "__main__":
    main()
