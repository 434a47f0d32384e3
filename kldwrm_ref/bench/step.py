"""``kldwrm bench step``: where each optimiser step's time goes, how it scales, and how close it
is to the machine's matrix-product throughput.

1. Breakdown: per optimiser (MLP 784-256-10, batch 512; EA-CM on the dense platform uses a
   49-32-10 net at batch 256, since a dense 203,530-parameter Fisher does not fit), preset, dtype
   and backend: the median step between refreshes, the mean refresh step (with its own phase
   breakdown in the JSON) and the amortised mean step over ``2 T`` steps (T = refresh period, so
   eigendecompositions are amortised), split into forward/backward, curvature statistics,
   inverse (eigendecompositions on refresh steps), preconditioning, QE inner solve and the rest.
   Timed with nothing else running; memory is a separate pass (:func:`step_memory`): the
   working memory of a step between refreshes and of a refresh step (the high-water mark of
   what the step allocates above what existed when it started, tracemalloc on the CPU, the memory
   pool's growth on a GPU), the host transfers of a step between refreshes and its allocation
   census (how many arrays of at least 4 KiB it allocates, and their bytes: NumPy's allocations
   on the host, requests to CuPy's memory pool on a GPU); and the array operations of a step, a
   lower bound on its kernel launches on a GPU, counted on array-api-strict arrays
   (:func:`step_operations`).
2. Limit: the throughput of a large GEMM in float32 and float64, the FLOPs of each step counted
   from the shapes (:func:`step_flops`), and the achieved fraction of that throughput.
3. Scaling: K-FAC step time against hidden width and batch size, and the dense Fisher build
   against parameter count, each with its fitted growth exponent (log-log slope).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np

from kldwrm_ref import optim
from kldwrm_ref.arrays import counting_transfers, is_cupy_namespace, is_numpy_namespace
from kldwrm_ref.bench.allocations import counting_allocations, counting_pool_allocations
from kldwrm_ref.bench.operations import counting_backend, counting_operations
from kldwrm_ref.bench.timing import gemm_throughput, median_time
from kldwrm_ref.curvature.fisher import fisher
from kldwrm_ref.data import synthetic_classification
from kldwrm_ref.model import MLP
from kldwrm_ref.model.zoo import NAMED_NETWORKS, arch_label, build_network, input_size
from kldwrm_ref.storage import write_json
from kldwrm_ref.validation import CommandParser, check_output_file

PHASES = ("forward_backward", "curvature", "inverse", "precondition", "inner")
BREAKDOWN_OPTIMIZERS = (
    ("sgd", "kfac"), ("kfac", "kfac"), ("ea-cm", "dense"), ("so-kld-wrm", "kfac"), ("q-kld-wrm", "kfac"), ("qe-kld-wrm", "kfac"),
)


def _products(mlp: MLP, batch: int) -> tuple[float, float]:
    """(forward FLOPs, backward FLOPs) of one batch: x W^T per layer; dW for all, dX below the top."""
    forward = sum(2.0 * batch * out * inp for out, inp in mlp.layer_shapes)
    backward = forward + sum(2.0 * batch * out * inp for out, inp in mlp.layer_shapes[1:])
    return forward, backward


def step_flops(name: str, mlp: MLP, batch: int, hyper: dict) -> float:
    """Floating-point work of one step, amortised over the refresh period (multiply-add = 2).

    Forward + backward; on refresh steps the factor statistics and eigendecompositions (~9 n^3
    each, with vectors) - or, on the dense platform, U^T U and a Cholesky (n^3 / 3) - divided by T; the preconditioning
    products (4 per K-FAC block in the eigenbasis; 2 with cached explicit inverses); for Q/QE
    the B s product; for QE per inner step a forward, a backward and a B s product, plus one
    forward per wake iterate.
    """
    forward, backward = _products(mlp, batch)
    flops = forward + backward
    if name == "sgd":
        return flops
    period = hyper["period"]
    if hyper["platform"] == "dense":
        n = mlp.n_params
        n_cot = mlp.n_classes if hyper["fisher_type"] == "exact" else 1
        refresh = 2.0 * batch * n_cot * n * n + n**3 / 3.0 + n_cot * backward  # U^T U, Cholesky
        return flops + refresh / period + 2.0 * n * n  # two triangular solves
    n_cot = mlp.n_classes if hyper["fisher_type"] == "exact" else 1
    refresh, solve, bs = (n_cot - 1) * backward, 0.0, 0.0
    for out, inp in mlp.layer_shapes:
        k = inp + 1 if hyper["bias"] == "joint" else inp
        refresh += 2.0 * batch * (inp + 1) ** 2 + 2.0 * n_cot * batch * out * out + 9.0 * (k**3 + out**3)
        products = 2 if hyper["damping_style"] == "factored-explicit" else 4
        solve += products / 2 * 2.0 * out * k * (out + k)
        bs += 2.0 * out * k * (out + k)
    flops += refresh / period + solve
    if name in ("q-kld-wrm", "qe-kld-wrm"):
        flops += bs
    if name == "qe-kld-wrm":
        flops += hyper["inner_steps"] * (forward + backward + bs) + hyper["m"] * forward
    return flops


def _setup(name: str, platform: str, preset: str, dtype, backend, architecture, batch: int, **overrides):
    """(optimiser, network, step, theta, state, batch_rows, steps to run after 3 warm-up steps)."""
    net = build_network(architecture, dtype=np.dtype(dtype).name)
    opt = optim.make(name, net, platform=platform, preset=preset, backend=backend, **overrides)
    period = opt.hyper.period if name != "sgd" else 1
    X, y = synthetic_classification(batch * 4, input_size(architecture), net.n_classes, seed=0, dtype=dtype)
    step, theta, state, batch_rows = _stepper(opt, net, net.init(0), X, y)
    return opt, net, step, theta, state, lambda k: batch_rows((k % 4) * batch, batch), 2 * max(period, 5)


def time_steps(name: str, platform: str, preset: str, dtype, backend: str, architecture, batch: int, **overrides) -> dict:
    """Run 2 T + 3 steps (T the refresh period) and summarise the last 2 T (warm-up excluded).
    ``architecture``: MLP sizes or a named network (``"paper-cnn"``); FLOPs are counted for MLPs."""
    opt, net, step, theta, state, batch_k, n_steps = _setup(name, platform, preset, dtype, backend, architecture, batch, **overrides)
    rows = []
    for k in range(n_steps + 3):
        start = time.perf_counter()
        theta, state, info = step(theta, state, *batch_k(k))
        wall = time.perf_counter() - start
        if k >= 3:
            rows.append((wall, info["time"], bool(info.get("refreshed", False))))
    walls = np.array([w for w, _, _ in rows])
    refreshed = np.array([r for _, _, r in rows])
    phases = {p: float(np.mean([t.get(p, 0.0) for _, t, _ in rows])) for p in PHASES}
    phases["rest"] = float(walls.mean()) - sum(phases.values())
    refresh_phases = {p: float(np.mean([t.get(p, 0.0) for _, t, r in rows if r])) if refreshed.any() else 0.0 for p in PHASES}
    hyper = opt.describe()
    return dict(
        optimizer=name, platform=platform, preset=preset, dtype=np.dtype(dtype).name, backend=backend,
        architecture=arch_label(architecture), batch=batch, period=opt.hyper.period if name != "sgd" else 1, median_s=float(np.median(walls)), mean_s=float(walls.mean()),
        median_non_refresh_s=float(np.median(walls[~refreshed])) if (~refreshed).any() else float("nan"),
        refresh_s=float(walls[refreshed].mean()) if refreshed.any() else float("nan"), refresh_phases_s=refresh_phases,
        phases_s=phases, flops=step_flops(name, net, batch, hyper) if isinstance(net, MLP) else float("nan"),
        inner_steps=hyper.get("inner_steps", 0) if name == "qe-kld-wrm" else 0,
    )


def step_memory(name: str, platform: str, preset: str, dtype, backend: str, architecture, batch: int, **overrides) -> dict:
    """The memory pass (separate from the timing, which it would slow): over the same 2 T steps after
    3 warm-up steps, the largest working memory of a step between refreshes and of a refresh step
    (bytes allocated above what existed when the step started, at its high-water mark: tracemalloc
    on the host, which NumPy reports every array to; on a GPU the growth of CuPy's memory pool,
    i.e. device memory the pool had to add), the most host transfers of a step between
    refreshes (:func:`kldwrm_ref.arrays.counting_transfers`; none on the CPU) and the allocation
    census of a typical step between refreshes, the one of median bytes (arrays of at least 4 KiB,
    how many, their bytes in all, the largest: :func:`~kldwrm_ref.bench.allocations.counting_allocations`
    on the host, :func:`~kldwrm_ref.bench.allocations.counting_pool_allocations` on a GPU; Q and
    QE's step after a refresh, which rebuilds their inverse, is the refresh's work, not a typical
    step)."""
    opt, net, step, theta, state, batch_k, n_steps = _setup(name, platform, preset, dtype, backend, architecture, batch, **overrides)
    xp = opt.network.backend.xp if opt.network is not None else net.backend.xp
    high_water, census = _high_water(xp), _census(xp)
    worst = {True: 0, False: 0}
    transfers, censuses = 0, []
    for k in range(n_steps + 3):
        with high_water() as used, counting_transfers() as log, census() as allocated:
            theta, state, info = step(theta, state, *batch_k(k))
        if k >= 3:
            refreshed = bool(info.get("refreshed", False))
            worst[refreshed] = max(worst[refreshed], used())
            if not refreshed:
                transfers = max(transfers, len(log))
                censuses += [allocated] if allocated is not None else []
    typical = sorted(censuses, key=lambda census: census.total_bytes)[len(censuses) // 2] if censuses else None
    counts = dict(allocations=typical.count, allocated_bytes=typical.total_bytes, largest_allocation_bytes=typical.largest) if typical is not None else dict(allocations=None, allocated_bytes=None, largest_allocation_bytes=None)
    return dict(step_bytes=worst[False], refresh_step_bytes=worst[True], host_transfers=transfers, **counts)


def step_operations(name: str, platform: str, preset: str, dtype, architecture, batch: int, **overrides) -> dict:
    """The operation pass: the same 2 T steps after 3 warm-up steps on array-api-strict arrays
    (:func:`kldwrm_ref.bench.operations.counting_operations`), the median count of array
    operations of a step between refreshes and the mean of a refresh step: a lower bound on the
    kernel launches of a step on a GPU, the same on every device.  None where array-api-strict is
    not installed, and on the dense platform (host only)."""
    counts: dict[bool, list[int]] = {True: [], False: []}
    try:
        backend = counting_backend()
    except ImportError:
        backend = None
    if backend is not None and platform != "dense":
        _, _, step, theta, state, batch_k, n_steps = _setup(name, platform, preset, dtype, backend, architecture, batch, **overrides)
        for k in range(n_steps + 3):
            with counting_operations() as census:
                theta, state, info = step(theta, state, *batch_k(k))
            if k >= 3:
                counts[bool(info.get("refreshed", False))].append(census.count)
    return dict(
        operations=int(np.median(counts[False])) if counts[False] else None,
        refresh_operations=round(float(np.mean(counts[True]))) if counts[True] else None,
    )


def _census(xp):
    """A context factory yielding the block's allocation census: NumPy's allocations on the host,
    CuPy's memory-pool requests on a GPU, None in another namespace."""
    if is_numpy_namespace(xp):
        return counting_allocations
    if is_cupy_namespace(xp):
        return counting_pool_allocations
    return lambda: nullcontext(None)


def _high_water(xp):
    """A context factory: ``with f() as used: ...`` then ``used()`` is the bytes the block allocated
    above what existed at its start, at its high-water mark (module docstring)."""
    if is_cupy_namespace(xp):
        import cupy

        pool = cupy.get_default_memory_pool()

        @contextmanager
        def pool_growth():
            before = pool.total_bytes()
            box = [0]
            yield lambda: box[0]
            box[0] = pool.total_bytes() - before

        return pool_growth

    @contextmanager
    def traced():
        already = tracemalloc.is_tracing()  # a caller's tracing is kept, not stopped
        if already:
            tracemalloc.reset_peak()
        else:
            tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        box = [0]
        try:
            yield lambda: box[0]
        finally:
            box[0] = tracemalloc.get_traced_memory()[1] - before
            if not already:
                tracemalloc.stop()

    return traced


def _stepper(opt: optim.Optimizer, net, theta, X, y):
    """(step, theta, state, batch(start, size)): the optimiser's own step on the arrays of its
    backend's namespace (theta, the state and the batches live on the GPU for backend "cuda"),
    synchronised before it returns so that the wall time covers the device's work."""
    backend = opt.network.backend if opt.network is not None else net.backend
    X_dev, y_dev = backend.asarray(X), backend.asarray(y)
    theta = backend.asarray(theta)
    synchronise = _synchroniser(backend.xp)

    def step(theta, state, X_batch, y_batch):
        out = opt.step(theta, state, X_batch, y_batch)
        synchronise()
        return out

    return step, theta, opt.init(theta), lambda start, size: (X_dev[start : start + size, ...], y_dev[start : start + size])


def _synchroniser(xp):
    """A function that waits for the device's queued work (nothing to wait for on the CPU)."""
    if is_cupy_namespace(xp):
        import cupy

        return cupy.cuda.get_current_stream().synchronize
    return lambda: None


def breakdown(presets, dtypes, backends, architectures=((784, 256, 10),), count_operations: bool = True, **overrides) -> list[dict]:
    """Every optimiser of :data:`BREAKDOWN_OPTIMIZERS` per architecture (batch 512; EA-CM on the dense
    platform always uses a 49-32-10 MLP at batch 256, so it runs once, with the first
    architecture): the timing pass, the memory pass, and unless ``count_operations`` is False the
    operation pass (once per optimiser, preset, dtype and architecture: its counts do not depend
    on the backend)."""
    results: list[dict] = []
    operations: dict[tuple, dict] = {}
    for dtype in dtypes:
        for backend in backends:
            for preset in presets:
                for a, architecture in enumerate(architectures):
                    for name, platform in BREAKDOWN_OPTIMIZERS:
                        if platform == "dense" and a > 0:
                            continue
                        arch, batch = ((49, 32, 10), 256) if platform == "dense" else (architecture, 512)
                        timed = time_steps(name, platform, preset, dtype, backend, arch, batch, **overrides)
                        key = (name, platform, preset, np.dtype(dtype).name, arch_label(arch))
                        if key not in operations:  # the same on every backend
                            operations[key] = step_operations(name, platform, preset, dtype, arch, batch, **overrides) if count_operations else {}
                        results.append(dict(timed, **step_memory(name, platform, preset, dtype, backend, arch, batch, **overrides), **operations[key]))
    return results


def growth_exponent(x, t) -> float:
    """Least-squares slope of log t against log x."""
    return float(np.polyfit(np.log(x), np.log(t), 1)[0])


def scaling(dtype, backend: str) -> dict:
    widths = [64, 128, 256, 512, 1024]
    batches = [128, 256, 512, 1024, 2048]
    by_width = [time_steps("kfac", "kfac", "paper", dtype, backend, (784, w, 10), 512)["mean_s"] for w in widths]
    by_batch = [time_steps("kfac", "kfac", "paper", dtype, backend, (784, 256, 10), b)["mean_s"] for b in batches]
    hidden = [8, 16, 32, 64]
    n_params, fisher_s = [], []
    for h in hidden:
        mlp = MLP([49, h, 10], dtype=dtype, backend=backend)
        X, _ = synthetic_classification(256, 49, 10, seed=1, dtype=dtype)
        theta = mlp.init(0)
        n_params.append(mlp.n_params)
        fisher_s.append(median_time(partial(fisher, mlp, theta, X), 3))
    return dict(widths=widths, width_s=by_width, batches=batches, batch_s=by_batch, fisher_params=n_params, fisher_s=fisher_s)


def format_breakdown(results: list[dict], peaks: dict) -> str:
    header = f"{'architecture':<12} {'optimizer':<12} {'preset':<6} {'dtype':<7} {'backend':<7}"
    header += f" {'non-refr':>8} {'refresh':>8} {'mean ms':>8}" + "".join(f" {p[:8]:>8}" for p in PHASES) + f" {'rest':>6} {'MiB/step':>8} {'MiB/refr':>8} {'allocs':>6} {'MiB alloc':>9}"
    header += f" {'ops':>5} {'ops/refr':>8} {'reads':>5} {'GFLOP':>6} {'% GEMM':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        fraction = r["flops"] / r["mean_s"] / peaks[peak_key(r)]
        line = f"{r['architecture']:<12} {r['optimizer']:<12} {r['preset']:<6} {r['dtype']:<7} {r['backend']:<7} {1e3 * r['median_non_refresh_s']:>8.2f} {1e3 * r['refresh_s']:>8.2f} {1e3 * r['mean_s']:>8.2f}"
        line += "".join(f" {1e3 * r['phases_s'][p]:>8.2f}" for p in PHASES) + f" {1e3 * r['phases_s']['rest']:>6.2f}"
        flops = f"{r['flops'] / 1e9:>6.2f} {100 * fraction:>6.1f}%" if np.isfinite(r["flops"]) else f"{'-':>6} {'-':>7}"
        line += f" {r.get('step_bytes', float('nan')) / 2**20:>8.2f} {r.get('refresh_step_bytes', float('nan')) / 2**20:>8.1f}"
        census = (f"{r['allocations']:>6} {r['allocated_bytes'] / 2**20:>9.1f}") if r.get("allocations") is not None else f"{'-':>6} {'-':>9}"
        operations = "".join(f" {r[key]:>{width}}" if r.get(key) is not None else f" {'-':>{width}}" for key, width in (("operations", 5), ("refresh_operations", 8), ("host_transfers", 5)))
        line += f" {census}{operations} {flops}"
        lines.append(line)
    return "\n".join(lines)


def format_scaling(s: dict) -> str:
    lines = ["K-FAC (paper preset) mean step against hidden width (batch 512):"]
    lines += [f"  width {w:>5}: {1e3 * t:8.2f} ms" for w, t in zip(s["widths"], s["width_s"])]
    lines.append(f"  growth exponent {growth_exponent(s['widths'], s['width_s']):.2f} (time ~ width^p)")
    lines.append("K-FAC (paper preset) mean step against batch size (784-256-10):")
    lines += [f"  batch {b:>5}: {1e3 * t:8.2f} ms" for b, t in zip(s["batches"], s["batch_s"])]
    lines.append(f"  growth exponent {growth_exponent(s['batches'], s['batch_s']):.2f}")
    lines.append("dense exact Fisher build (batch 256) against parameter count n:")
    lines += [f"  n {n:>6}: {1e3 * t:8.2f} ms" for n, t in zip(s["fisher_params"], s["fisher_s"])]
    lines.append(f"  growth exponent {growth_exponent(s['fisher_params'], s['fisher_s']):.2f} (U^T U costs ~ n^2)")
    return "\n".join(lines)


def peak_key(result: dict) -> str:
    """Which GEMM throughput a result is measured against: the GPU's for backend cuda."""
    return f"cuda-{result['dtype']}" if result["backend"] == "cuda" else result["dtype"]


def targets(results: list[dict], peaks: dict) -> str:
    """The issue's targets per (preset, dtype, backend): K-FAC and SO at >= 75% of GEMM throughput
    for their own FLOPs, and a QE step within (1 + inner steps) SO steps."""
    lines = []
    groups: dict = {}
    for r in results:
        groups.setdefault((r["architecture"], r["preset"], r["dtype"], r["backend"]), {})[r["optimizer"]] = r
    for (architecture, preset, dtype, backend), by_name in groups.items():
        parts = []
        for name in ("kfac", "so-kld-wrm"):
            if name in by_name and np.isfinite(by_name[name]["flops"]):
                r = by_name[name]
                parts.append(f"{name} {100 * r['flops'] / r['mean_s'] / peaks[peak_key(r)]:.0f}% of GEMM")
        if "qe-kld-wrm" in by_name and "so-kld-wrm" in by_name:
            qe, so = by_name["qe-kld-wrm"], by_name["so-kld-wrm"]
            inner = qe.get("inner_steps", 0)
            parts.append(f"QE / SO = {qe['mean_s'] / so['mean_s']:.1f} (bound 1 + inner steps = {1 + inner})")
        lines.append(f"  {architecture:<12} {preset:<6} {dtype:<7} {backend:<6}: " + "; ".join(parts))
    return "\n".join(lines)


def _architecture(text: str) -> tuple[int, ...] | str:
    """``--architectures`` item: a named network, or MLP sizes of >= 2 layers, each >= 1."""
    if text in NAMED_NETWORKS:
        return text
    try:
        sizes = tuple(int(part) for part in text.split("-"))
    except ValueError:
        sizes = ()
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"must be MLP sizes like 784-256-10 (>= 2 layers, each >= 1) or one of {', '.join(NAMED_NETWORKS)}, got {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="kldwrm bench step", description="Where each optimiser step's time goes (per phase), how it scales with width and batch, and how close it is to the machine's matrix-product throughput.")
    parser.add_argument("--presets", nargs="+", choices=optim.PRESETS, default=list(optim.PRESETS), help=f"presets to time (default: {' '.join(optim.PRESETS)})")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"], help="floating-point types (default: float32 float64)")
    parser.add_argument("--backends", nargs="+", choices=["numpy", "numba", "auto", "cuda"], default=["numpy", "numba"], help="array backends; cuda: every array on the GPU, CuPy + numba-cuda (docs/gpu.md) (default: numpy numba)")
    parser.add_argument("--damping-style", choices=["eigen", "factored", "factored-explicit"], help="override the K-FAC damping style (default: the preset's)")
    parser.add_argument("--architectures", nargs="+", default=["784-256-10"], type=_architecture, metavar="ARCH", help=f"MLP sizes like 784-256-10 (>= 2 layers, each >= 1), or one of {', '.join(NAMED_NETWORKS)} (default: 784-256-10)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling tables")
    parser.add_argument("--no-operations", action="store_true", help="skip the operation pass (its counts are the same on every device)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH (default: none)")
    args = parser.parse_args(argv)
    if args.json:
        try:
            check_output_file(args.json, "--json")
        except ValueError as error:
            parser.error(str(error))
    overrides = {"damping_style": args.damping_style} if args.damping_style else {}
    peaks = {name: gemm_throughput(np.dtype(name).type) for name in ("float32", "float64")}
    if "cuda" in args.backends:
        from kldwrm_ref.bench.timing import device_gemm_throughput

        peaks.update({f"cuda-{name}": device_gemm_throughput(np.dtype(name).type) for name in ("float32", "float64")})
    print("GEMM throughput (n^3 product; cuda: the tiled kernel): " + ", ".join(f"{name} {peak / 1e9:.1f} GFLOP/s" for name, peak in peaks.items()))
    results = breakdown(args.presets, [np.dtype(d).type for d in args.dtypes], args.backends, args.architectures, count_operations=not args.no_operations, **overrides)
    print("\nper-step breakdown (ms; non-refr = median step between refreshes, refresh = mean refresh step, mean = amortised over 2 refresh periods;"
          " MiB/step, MiB/refr = working memory of a step between refreshes / a refresh step, from a separate pass;"
          " allocs, MiB alloc = the arrays of >= 4 KiB a typical step between refreshes allocates and their bytes in all (cuda: requests to CuPy's memory pool);"
          " ops, ops/refr = array operations of a step between refreshes / a refresh step, counted on array-api-strict (each one GPU kernel launch or more; - without array-api-strict or on the dense platform);"
          " reads = host transfers of a step between refreshes (each a synchronisation on a GPU; none on the CPU); % GEMM = step FLOPs / mean time / GEMM throughput)")
    print(format_breakdown(results, peaks))
    print("\ntargets (amortised mean step):")
    print(targets(results, peaks))
    report: dict = dict(gemm_flops_per_s=peaks, breakdown=results)
    if not args.no_scaling:
        report["scaling"] = scaling(np.float32, args.backends[0])
        print("\nscaling (float32, backend " + args.backends[0] + ")")
        print(format_scaling(report["scaling"]))
    if args.json:
        write_json(args.json, report)
    return 0
