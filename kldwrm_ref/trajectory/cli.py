"""``kldwrm trajectory export`` and ``kldwrm trajectory compare`` (docs/trajectory-format.md).

``export`` runs the first K steps of a ``kldwrm mnist`` run - theta_0 = ``init(seed)``, the batches of
epoch e drawn by ``default_rng([seed, e]).permutation(n)`` (docs/conventions.md, "Data and
batches") - on MNIST or the synthetic problem, and saves the recorded trajectory; it prints the
expected size first and refuses one above ``--max-size``.  ``compare`` prints every step's relative
errors and exits 1 at the first one above ``--rtol`` (or, with ``--strict``, when a candidate
quantity is not compared).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kldwrm_ref import optim
from kldwrm_ref.data import MNIST_MEAN, MNIST_STD, MnistDataError, load_mnist, synthetic_classification
from kldwrm_ref.model.zoo import NAMED_NETWORKS, arch_label, build_network
from kldwrm_ref.optim import SPECS
from kldwrm_ref.trajectory.compare import DEFAULT_RTOL, compare
from kldwrm_ref.trajectory.format import QUANTITIES, TrajectoryError, check_destination, load, save
from kldwrm_ref.trajectory.record import expected_size, record, select

DEFAULT_MAX_SIZE_MB = 500
SYNTHETIC = dict(n_train=2000, n_test=500, n_classes=10, generator_seed=1234)  # ``kldwrm mnist --synthetic``: the first n_train rows train


def _architecture(text: str) -> list[int] | str:
    if text in NAMED_NETWORKS:
        return text
    try:
        sizes = [int(part) for part in text.split("-")]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"architecture must be MLP sizes like 784-32-10 or one of {', '.join(NAMED_NETWORKS)}, got {text!r}")
    return sizes


def _hyper(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE items, values parsed as JSON where they parse (else kept as strings)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--hyper takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def step_indices(n: int, batch: int, seed: int, steps: int) -> list[np.ndarray]:
    """The rows of each of the first ``steps`` batches: epoch e (from 1) visits
    default_rng([seed, e]).permutation(n) in full batches (a remainder is dropped)."""
    per_epoch = n // batch
    indices: list[np.ndarray] = []
    epoch = 0
    while len(indices) < steps:
        epoch += 1
        order = np.random.default_rng([seed, epoch]).permutation(n)
        indices += [order[i * batch : (i + 1) * batch] for i in range(min(per_epoch, steps - len(indices)))]
    return indices


def export(args: argparse.Namespace) -> int:
    net = build_network(args.architecture, args.activation, args.dtype, "numpy")
    n_inputs = int(np.prod(net.input_shape))
    if args.synthetic:
        X, y = synthetic_classification(SYNTHETIC["n_train"] + SYNTHETIC["n_test"], n_inputs, SYNTHETIC["n_classes"], seed=SYNTHETIC["generator_seed"], dtype=args.dtype)
        X, y = X[: SYNTHETIC["n_train"]], y[: SYNTHETIC["n_train"]]
        data: dict[str, Any] = dict(source="synthetic", generator="kldwrm_ref.data.synthetic_classification", rows="n_train + n_test generated, the first n_train train", n_features=n_inputs, dtype=args.dtype, **SYNTHETIC)
    else:
        if n_inputs != 784:
            raise ValueError(f"--architecture takes {n_inputs} inputs; MNIST images have 784 (use --synthetic for other sizes)")
        mnist = load_mnist(dtype=args.dtype)
        X, y = mnist.X_train, mnist.y_train
        data = dict(source="mnist", split="train", n_train=len(y), pixels="k / 255", mean=MNIST_MEAN, std=MNIST_STD, dtype=args.dtype)
    if args.batch > len(y):
        raise ValueError(f"--batch must be in [1, {len(y)}] (the training set's size), got {args.batch}")
    opt = optim.make(args.optimizer, net, platform=args.platform, preset=args.preset, backend="numpy", **{"seed": args.seed, **_hyper(args.hyper)})
    indices = step_indices(len(y), args.batch, args.seed, args.steps)
    data.update(order="step k takes rows indices[k]; epoch e (from 1) visits default_rng([seed, e]).permutation(n_train) in full batches", seed=args.seed, batch=args.batch, indices=[rows.tolist() for rows in indices])
    theta0, choice = net.init(args.seed), dict(eigen=args.eigen, only=args.only, skip=args.skip)
    compressed, uncompressed = expected_size(opt, theta0, X[indices[0]], y[indices[0]], args.steps, **choice)
    print(f"expected size: about {compressed / 1e6:.3g} MB ({uncompressed / 1e6:.3g} MB uncompressed) in {args.steps} step files", flush=True)
    if compressed > args.max_size * 1e6:
        raise ValueError(f"the export would take about {compressed / 1e6:.3g} MB, above --max-size {args.max_size:g} MB; record fewer --steps, fewer quantities (--only / --skip), or raise --max-size")
    check_destination(args.out, "--out", probe=True)
    start = time.perf_counter()
    trajectory = record(opt, theta0, ((X[rows], y[rows]) for rows in indices), data=data, **choice)
    try:
        folder = save(trajectory, args.out)
    except OSError as error:
        raise SaveError(f"--out {args.out!r}: writing the trajectory failed ({error.strerror or error})") from None
    size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    print(f"{args.optimizer} ({args.preset}, {args.platform}) on {arch_label(args.architecture)} ({net.n_params} parameters): {args.steps} steps in {time.perf_counter() - start:.1f} s, {size / 1e6:.3g} MB in {folder}")
    return 0


class SaveError(Exception):
    """The run succeeded but its trajectory could not be written (exit status 1)."""


def compare_main(args: argparse.Namespace) -> int:
    comparison = compare(load(args.ref), load(args.cand))
    print(comparison.report(args.rtol, args.strict))
    return 0 if comparison.passed(args.rtol, args.strict) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kldwrm trajectory", description="Export a reference trajectory of per-step quantities, or compare two trajectories (docs/trajectory-format.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="run an optimiser for a few steps and save every step's quantities")
    ex.add_argument("--optimizer", required=True, choices=tuple(SPECS))
    ex.add_argument("--architecture", required=True, type=_architecture, metavar="ARCH", help=f"MLP sizes (e.g. 784-32-10) or one of {', '.join(NAMED_NETWORKS)}")
    ex.add_argument("--preset", required=True, choices=optim.PRESETS)
    ex.add_argument("--steps", required=True, type=int)
    ex.add_argument("--hyper", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="hyperparameter override (repeatable)")
    ex.add_argument("--batch", type=int, default=512)
    ex.add_argument("--seed", type=int, default=0, help="theta_0 = init(seed), the batch order and the optimiser's seed (default 0)")
    ex.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    ex.add_argument("--platform", choices=optim.PLATFORMS, default="kfac", help="curvature platform (default kfac)")
    ex.add_argument("--activation", choices=("relu", "tanh"), default="relu", help="MLP hidden activation (default relu)")
    ex.add_argument("--synthetic", action="store_true", help="the synthetic problem of kldwrm mnist --synthetic instead of MNIST")
    ex.add_argument("--eigen", action="store_true", help="also record the eigenpairs the K-FAC inverse is applied in")
    ex.add_argument("--only", nargs="+", metavar="QUANTITY", help=f"record only these quantities (theta, loss, g and s always): {', '.join(QUANTITIES)}")
    ex.add_argument("--skip", nargs="+", default=[], metavar="QUANTITY", help="do not record these quantities")
    ex.add_argument("--max-size", type=float, default=DEFAULT_MAX_SIZE_MB, metavar="MB", help=f"refuse an export expected above this size (default {DEFAULT_MAX_SIZE_MB} MB)")
    ex.add_argument("--out", required=True, help="output directory: new, empty, or a trajectory (replaced)")
    cmp = commands.add_parser("compare", help="relative errors per step and quantity; exit 1 at the first above --rtol")
    cmp.add_argument("ref", help="reference trajectory directory")
    cmp.add_argument("cand", help="candidate trajectory directory")
    cmp.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default {DEFAULT_RTOL:g})")
    cmp.add_argument("--strict", action="store_true", help="fail (exit 1) when a candidate quantity is not compared, instead of warning")
    args = parser.parse_args(argv)
    if args.command == "compare":
        if not args.rtol >= 0:
            parser.error(f"--rtol must be a number >= 0, got {args.rtol}")
        try:
            return compare_main(args)
        except TrajectoryError as error:
            parser.exit(2, f"kldwrm trajectory compare: error: {error}\n")
    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        parser.error(f"--seed must be an integer >= 0, got {args.seed}")
    if not args.max_size > 0:
        parser.error(f"--max-size must be a number of MB > 0, got {args.max_size}")
    try:
        check_destination(args.out, "--out")
        select(args.only, args.skip)
        return export(args)
    except (ValueError, MnistDataError, optim.DivergenceError) as error:
        parser.exit(2, f"kldwrm trajectory export: error: {error}\n")
    except SaveError as error:
        parser.exit(1, f"kldwrm trajectory export: error: {error}\n")
