"""Fashion-MNIST with a small ResNet-style CNN, data-parallel, with hvd_gradq's compression.

    horovodrun -np 2 -H localhost:2 python examples/fashion_mnist_cnn.py --bits 2      # a Horovod job
    python examples/fashion_mnist_cnn.py --workers 4 --compressor qsgd --bits 3       # 4 simulated workers

Prints its progress (a bar on a terminal), the test accuracy after every epoch and the bytes per step handed to the
collectives against float32; ``--log-json`` writes the JSON log (see examples/common.py). Data:
Debian's dataset-fashion-mnist (60k training / 10k test images), nothing downloaded.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import Task, add_arguments, run
from workloads.tasks import TASKS

CNN = TASKS["cnn"]  # FashionCNN on Fashion-MNIST


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, bits=2, lr=0.05, batch_size=64, epochs=2)
    p.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--test-limit", type=int, default=0, help="score only the first N test images (0: all 10k)")
    return p.parse_args(argv)


def make_task(args: argparse.Namespace) -> Task:
    x_train, y_train = CNN.data("train")
    x_test, y_test = CNN.data("test")
    if args.train_limit:
        x_train, y_train = x_train[:args.train_limit], y_train[:args.train_limit]
    if args.test_limit:
        x_test, y_test = x_test[:args.test_limit], y_test[:args.test_limit]
    b = args.batch_size
    orders: dict[int, torch.Tensor] = {}

    def micro_batch(step: int, worker: int, workers: int, epoch: int):
        if epoch not in orders:  # one shuffle per epoch, the same on every rank
            orders.clear()
            orders[epoch] = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 1000
                                                                                                  + epoch))
        idx = orders[epoch][(step * workers + worker) * b:(step * workers + worker + 1) * b]
        return x_train[idx], y_train[idx]

    def evaluate(model) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum())
                          for i in range(0, len(x_test), 1000))
            loss = sum(float(F.cross_entropy(model(x_test[i:i + 1000]), y_test[i:i + 1000], reduction="sum"))
                       for i in range(0, len(x_test), 1000))
        model.train()
        return {"test_accuracy": correct / len(x_test), "test_loss": loss / len(x_test)}

    def probe(k: int, gen: torch.Generator):
        idx = torch.randint(len(x_train), (k, b), generator=gen)
        return [(x_train[i], y_train[i]) for i in idx]

    return Task(
        name=CNN.title, model=CNN.model(width=args.width), criterion=F.cross_entropy, micro_batch=micro_batch,
        steps_per_epoch=lambda workers: len(x_train) // (b * workers), evaluate=evaluate, probe=probe,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4))


def main(argv=None) -> dict:
    return run(make_task, parse_args(argv))


if __name__ == "__main__":
    main()
