"""``kldwrm train``: a short MNIST comparison of optimisers (784-256-10 MLP, K-FAC platform).

Each optimiser starts from the same initialisation and sees the same batches; after every epoch
the test accuracy and loss are printed.  The full experiment suite (seeds, resumable runs,
plots) is a separate command.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import numpy as np

from kldwrm_ref import MLP, optim
from kldwrm_ref.data import load_mnist, synthetic_classification


def train(name: str, mlp: MLP, data, epochs: int, batch: int, seed: int, platform: str, preset: str, log=print) -> list[dict]:
    X_train, y_train, X_test, y_test = data
    opt = optim.make(name, mlp, platform=platform, preset=preset)
    theta = mlp.init(seed)
    state = opt.init(theta)
    rng = np.random.default_rng(seed)
    history = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(y_train))
        losses = []
        for i in range(0, len(order) - batch + 1, batch):
            rows = order[i : i + batch]
            theta, state, info = opt.step(theta, state, X_train[rows], y_train[rows])
            losses.append(info["loss"])
        record = dict(optimizer=name, epoch=epoch, train_loss=float(np.mean(losses)), test_loss=mlp.loss(theta, X_test, y_test), test_accuracy=mlp.accuracy(theta, X_test, y_test), seconds=time.perf_counter() - start)
        history.append(record)
        log(f"{name:<12} epoch {epoch:>3}  train loss {record['train_loss']:.4f}  test loss {record['test_loss']:.4f}  test acc {100 * record['test_accuracy']:.2f}%  {record['seconds']:.1f} s")
    return history


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kldwrm train", description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"], choices=optim.NAMES)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--platform", choices=optim.PLATFORMS, default="kfac")
    parser.add_argument("--preset", choices=optim.PRESETS, default="paper")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data instead of MNIST (no download)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch < 1 or args.hidden < 1:
        parser.error("--epochs, --batch and --hidden must be >= 1")
    if args.synthetic:
        X, y = synthetic_classification(12000, 784, 10, args.seed)
        data = (X[:10000], y[:10000], X[10000:], y[10000:])
    else:
        mnist = load_mnist()
        data = (mnist.X_train, mnist.y_train, mnist.X_test, mnist.y_test)
    mlp = MLP([784, args.hidden, 10])
    results = []
    for name in args.optimizers:
        results.append(train(name, mlp, data, args.epochs, args.batch, args.seed, args.platform, args.preset)[-1])
    print(f"\nafter {args.epochs} epoch(s), MLP 784-{args.hidden}-10, preset {args.preset}, seed {args.seed}:")
    for r in results:
        print(f"  {r['optimizer']:<12} test accuracy {100 * r['test_accuracy']:.2f}%  ({r['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
