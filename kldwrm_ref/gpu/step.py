"""The device-resident training step: the update rules of :mod:`kldwrm_ref.optim` with theta, the
batch and the optimiser state on the GPU (docs/theory.md §2-§7; docs/gpu.md).

:func:`make_device` turns a host :class:`~kldwrm_ref.optim.Optimizer` (K-FAC platform, or SGD) into
a :class:`DeviceOptimizer` whose ``step(theta, state, X, y)`` takes and returns device arrays and an
:class:`~kldwrm_ref.optim.OptState` whose arrays are device arrays.  The phases are those of
:func:`kldwrm_ref.optim.curvature_method.make_curvature_method`, in the same order and with the same
arithmetic; what crosses the bus:

- every step: one small float64 "scalars" read per phase that needs a number on the host (the loss
  and finiteness counts, the clip inputs, the step norm); a stochastic network's dropout flags;
- refresh steps: the new averaged factors (and B_k for Q / QE) down, the eigenbases of the damped
  inverse up - the eigendecompositions run on the host (LAPACK), nothing else does; for
  ``fisher_type="mc"`` the Monte-Carlo uniforms up;
- Q / QE with ``stale_current="average"``: with a constant step size the inverse the next step
  needs is built on the refresh step too; under a step-size schedule Q / QE rebuild it, and upload
  its eigenbases, on every step whose alpha differs.

:meth:`DeviceOptimizer.upload` and :meth:`DeviceOptimizer.download` convert to and from the host
state, so checkpoints are the host ones (the cached inverse is rebuilt after a resume, as on the host).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from kldwrm_ref.backends import cuda as device_ops
from kldwrm_ref.curvature.averaging import EAState, ExponentialAverage, truncated_wake_weights
from kldwrm_ref.curvature.inverses import ExactKronSumInverse, FactoredKronSumInverse, SingularCurvatureError
from kldwrm_ref.curvature.linalg import CurvatureError
from kldwrm_ref.gpu import kernels
from kldwrm_ref.gpu.network import DeviceCache, DeviceNetwork
from kldwrm_ref.gpu.transfers import is_device_array, to_device, to_host
from kldwrm_ref.optim.clipping import clip_groups
from kldwrm_ref.optim.curvature_method import SPECS, PhaseTimer, estimator_for
from kldwrm_ref.optim.state import DivergenceError, Optimizer, OptState, Previous, step_size_or_raise


def unsupported_reason(opt: Optimizer) -> str | None:
    """Why ``opt`` cannot run device-resident (None when it can)."""
    if opt.network is None:
        return "the optimiser carries no network"
    if opt.name != "sgd" and opt.platform != "kfac":
        return f"platform {opt.platform!r}: only the K-FAC platform (and SGD) run device-resident"
    if opt.name == "qe-kld-wrm" and opt.hyper.inner != "sgd":
        return f"inner={opt.hyper.inner!r}: QE's device-resident inner solve is the authors' momentum SGD (inner='sgd')"
    return None


def _tree(fn, tree):
    """Apply ``fn`` to every array leaf of nested tuples / NamedTuples (None and scalars pass)."""
    if isinstance(tree, tuple):
        mapped = [_tree(fn, leaf) for leaf in tree]
        return type(tree)(*mapped) if hasattr(tree, "_fields") else tuple(mapped)
    if isinstance(tree, np.ndarray) or is_device_array(tree):
        return fn(tree)
    return tree


def _leaves(tree) -> list:
    if isinstance(tree, tuple):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree] if tree is not None else []


class DeviceSolver(NamedTuple):
    """A damped K-FAC inverse on the device: per block its eigenbases (Q_G, Q_A), the row and column
    scales of the eigenbasis divide and its scalar; ``kron_sum`` selects V'/(1 + s nu mu^T) over
    V'/(d_G d_A^T + s) (docs/theory.md §5.2, §5.5)."""

    blocks: list[tuple[Any, Any, Any, Any, float]]
    kron_sum: bool


class DeviceCurvature(NamedTuple):
    """OptState.inverse on the device path: host copies of Mbar (and B_k) taken at the refresh that
    made them, and the device solvers built from them, by key (docs/gpu.md)."""

    host_average: tuple
    host_current: tuple | None
    solvers: dict


class DeviceOptimizer:
    """``step(theta, state, X, y) -> (theta, state, info)`` on device arrays (module docstring)."""

    def __init__(self, opt: Optimizer):
        reason = unsupported_reason(opt)
        if reason is not None:
            raise ValueError(f"{opt.name} cannot run device-resident: {reason}")
        assert opt.network is not None
        self.opt, self.name, self.hyper = opt, opt.name, opt.hyper
        self.net = opt.network.with_backend("numpy")  # host-side maths (inverses) in NumPy
        self.device_net = DeviceNetwork(self.net)
        self.sgd = opt.name == "sgd"
        self.spec = SPECS.get(opt.name, SPECS["ea-cm"])  # (SGD reads none of it)
        if not self.sgd:
            self.estimator = estimator_for(self.net, self.hyper, "kfac")
            self.average = ExponentialAverage.create(self.hyper.rho, self.hyper.period)
            self.blocks = []  # (layer among the parametrised, BlockSpec, device positions, (out, k))
            for p, spec in self.net.kfac_blocks(self.hyper.bias):
                out = self.net.shapes[self.net.parametrised[p] + 1][0]  # G is out x out for every block of a layer
                self.blocks.append((p, spec, to_device(spec.positions, np.int64), (out, spec.positions.size // out)))
        self.groups = clip_groups(self.net, self.hyper.rms_clip_per)

    # ---------------------------------------------------------------- state on and off the device
    def upload(self, theta: np.ndarray, state: OptState):
        """(device theta, device state) from host ones (the inverse is rebuilt by the next step)."""
        if not self.sgd and self.spec.uses_current and state.ea is not None and state.ea.average is not None and state.current is None:
            raise ValueError(f"state holds an averaged curvature but no current estimate B_k, which {self.name} needs")
        device_state = _tree(to_device, state._replace(inverse=None))
        if not self.sgd and state.ea is not None and state.ea.average is not None:
            device_state = device_state._replace(inverse=DeviceCurvature(state.ea.average, state.current, {}))
        return to_device(theta), device_state

    def download(self, theta, state: OptState) -> tuple[np.ndarray, OptState]:
        """(host theta, host state without the cached inverse): what checkpoints store."""
        return to_host(theta), _tree(to_host, state._replace(inverse=None))

    # ---------------------------------------------------------------- the step
    def step(self, theta, state: OptState, X, y):
        if self.sgd:
            return self._sgd_step(theta, state, X, y)
        return self._curvature_step(theta, state, X, y)

    def _gradient(self, k: int, theta, X, y, timer):
        """1. gradient: (loss, g, cache, dlogits, keeps); one scalars read checks batch, loss and g."""
        with timer("forward_backward"):
            n = X.shape[0]
            keeps = self.device_net.dropout_keeps(self.net.training_rng((self.hyper.seed, k, 1)), n)
            cache = self.device_net.forward(theta, X, keeps)
            losses, dlogits = device_ops.xent_device(cache.logits, y)
            g = self.device_net.vjp(theta, cache, dlogits)
            kernels.scale(g, 1.0 / n)
            scalars = kernels.zeros(3, np.float64)
            kernels.nonfinite(X, scalars, 0)
            kernels.total(losses, scalars, 1)
            kernels.nonfinite(g, scalars, 2)
            bad_batch, loss_sum, bad_gradient = to_host(scalars)
            if bad_batch:
                raise DivergenceError(k, "batch", "holds a NaN or an infinity")
            loss = loss_sum / n
            if not math.isfinite(loss):
                raise DivergenceError(k, "loss")
            if bad_gradient:
                raise DivergenceError(k, "gradient")
        return loss, g, cache, dlogits, keeps

    def _sgd_step(self, theta, state: OptState, X, y):
        timer, k, hyper = PhaseTimer(), state.step, self.hyper
        alpha = step_size_or_raise(hyper.step_size, k)
        loss, g, _, _, _ = self._gradient(k, theta, X, y, timer)
        with timer("apply"):
            kernels.axpby(1.0, g, hyper.weight_decay, theta, g)
            velocity = kernels.axpby(hyper.momentum, state.velocity, 1.0, g)
            s = kernels.axpby(-alpha, velocity, 0.0, velocity)
            norm = self._step_norm(k, s, s)
        timer.times["total"] = sum(timer.times.values())
        return kernels.axpby(1.0, theta, 1.0, s), state._replace(step=k + 1, velocity=velocity), dict(loss=loss, step_norm=norm, time=timer.times)

    def _curvature_step(self, theta, state: OptState, X, y):
        timer, k, hyper, spec = PhaseTimer(), state.step, self.hyper, self.spec
        assert state.ea is not None, "state was not made by this optimiser's init"
        alpha = step_size_or_raise(hyper.step_size, k)
        loss, g, cache, dlogits, keeps = self._gradient(k, theta, X, y, timer)

        with timer("curvature"):  # 2. update curvature; the host copies of Mbar are taken here
            refresh = self.average.due(state.ea)
            current, curvature = state.current, state.inverse
            if refresh:
                current = self._estimate(k, theta, X, cache, dlogits)
                ea = self._absorb(state.ea, current)
                host_average = _tree(to_host, ea.average)
                host_current = _tree(to_host, current) if spec.uses_current else None
                curvature = DeviceCurvature(host_average, host_current, {})
            else:
                ea = state.ea._replace(calls=state.ea.calls + 1)
            averaged = ea.average

        with timer("inverse"):  # 3. refresh inverse (eigendecompositions on the host)
            B = None
            if spec.uses_current:
                B = current if (refresh or hyper.stale_current == "last") else averaged
            solver = self._solver(curvature, ea.updates, refresh, alpha, k)
            if refresh and spec.uses_current and hyper.stale_current == "average" and hyper.period > 1 and not callable(hyper.step_size):
                self._prefetch(curvature, ea.updates, k)

        with timer("precondition"):  # 4. wake-correct, 5. precondition and clip
            ghat = self._corrected_gradient(state, g, alpha, k)
            ghat_wd = kernels.axpby(1.0, ghat, hyper.weight_decay, theta)
            unclipped = self._apply_solver(solver, ghat_wd)
            v, info = self._clip(unclipped, ghat_wd, alpha)
            s = q_step = kernels.axpby(-alpha, v, 0.0, v)

        wake = state.wake
        if spec.inner_solve:  # 6. inner solve
            with timer("inner"):
                wake = (wake + (theta,))[-hyper.m :]
                if len(wake) == hyper.m or not hyper.inner_after_full_wake:
                    s = self._inner_solve(theta, s, g, B, alpha, wake, X, k, keeps)

        with timer("apply"):  # 7. apply, and remember what the next correction needs
            norm = self._step_norm(k, s, q_step)
            model_gradient = None
            if spec.correction == "gradient":
                model_gradient = g
            elif spec.correction == "model" and hyper.correction == "exact" and B is not None:
                model_gradient = kernels.axpby(1.0, g, 1.0, self._apply_factors(B, s))
            previous = Previous(alpha, g, ghat, v, model_gradient)
            new_state = OptState(k + 1, ea, curvature, current, previous, wake)
            new_theta = kernels.axpby(1.0, theta, 1.0, s)
        timer.times["total"] = sum(timer.times.values())
        info.update(loss=loss, step_norm=norm, refreshed=refresh, time=timer.times)
        return new_theta, new_state, info

    def _step_norm(self, k: int, s, q_step) -> float:
        """|s|, with the finiteness checks of the Q step and of the final step in one read."""
        scalars = kernels.zeros(3, np.float64)
        kernels.nonfinite(q_step, scalars, 0)
        kernels.nonfinite(s, scalars, 1)
        kernels.dot(s, s, scalars, 2)
        bad_q, bad_s, squared = to_host(scalars)
        if bad_q:
            raise DivergenceError(k, "step")
        if bad_s:
            raise DivergenceError(k, "inner-solve step")
        return math.sqrt(squared)

    # ---------------------------------------------------------------- curvature
    def _estimate(self, k: int, theta, X, cache: DeviceCache, dlogits) -> tuple:
        """M_k: the K-FAC factors from the Fisher's cotangents of the cached pass (docs/theory.md §1.3)."""
        hyper, n = self.hyper, X.shape[0]
        if hyper.fisher_type == "empirical":
            rows = dlogits
        elif hyper.fisher_type == "exact":
            rows = kernels.exact_rows(kernels.softmax(cache.logits))
        else:
            uniforms = np.random.default_rng((hyper.seed, k)).random((hyper.samples, n))
            probs = kernels.softmax(cache.logits)
            rows = kernels.sampled_rows(probs, device_ops.sample_labels_device(probs, to_device(uniforms)))  # float64, as on the host
        cotangents = self.device_net.backward(theta, cache, rows)
        factors = self.device_net.kfac_factors(cache, cotangents, n)
        leaves = _leaves(factors)
        scalars = kernels.zeros(len(leaves), np.float64)
        for i, leaf in enumerate(leaves):
            kernels.nonfinite(leaf, scalars, i)
        if np.any(to_host(scalars)):
            raise DivergenceError(k, "curvature")
        return factors

    def _absorb(self, ea: EAState, new: tuple) -> EAState:
        """The exponential average after a refresh, in fresh arrays (the old one stays readable)."""
        if ea.average is None:
            return EAState(_tree(kernels.copy, new), 1, ea.calls + 1)

        def blend(average, m):
            out = kernels.empty(average.shape, average.dtype)
            device_ops.ea_device(average, m, self.average.rho, out)
            return out

        blended = [blend(a, m) for a, m in zip(_leaves(ea.average), _leaves(new))]
        return EAState(_rebuild(ea.average, blended), ea.updates + 1, ea.calls + 1)

    def _host_inverse(self, curvature: DeviceCurvature, alpha: float, fresh: bool):
        """The host inverse the NumPy step would build (eigendecompositions in LAPACK)."""
        if not self.spec.uses_current:
            return self.estimator.inverse(curvature.host_average)
        B = curvature.host_current if fresh else curvature.host_average
        assert B is not None
        return self.estimator.sum_inverse(curvature.host_average, B, alpha)

    def _key(self, updates: int, alpha: float, refresh: bool):
        if not self.spec.uses_current:
            return (updates,)
        return (updates, alpha, refresh or self.hyper.stale_current == "last")

    def _solver(self, curvature: DeviceCurvature, updates: int, refresh: bool, alpha: float, k: int) -> DeviceSolver:
        key = self._key(updates, alpha, refresh)
        if key not in curvature.solvers:
            try:
                host = self._host_inverse(curvature, alpha, key[-1] if len(key) == 3 else True)
            except (CurvatureError, SingularCurvatureError) as error:
                raise DivergenceError(k, "curvature inverse", f"failed: {error}") from error
            curvature.solvers.clear()
            curvature.solvers[key] = self._upload_solver(host)
        return curvature.solvers[key]

    def _prefetch(self, curvature: DeviceCurvature, updates: int, k: int) -> None:
        """Build step k+1's Q / QE inverse (B := Mbar, the same constant alpha) now, so that step
        uploads nothing.  (Not under a schedule: it would call the schedule ahead of its step.)"""
        alpha = step_size_or_raise(self.hyper.step_size, k + 1)  # a constant: no schedule is called
        key = self._key(updates, alpha, False)
        try:
            if key not in curvature.solvers:
                curvature.solvers[key] = self._upload_solver(self._host_inverse(curvature, alpha, False))
        except (CurvatureError, SingularCurvatureError):
            pass  # step k+1 builds it itself, and reports the failure there

    def _upload_solver(self, host) -> DeviceSolver:
        """The eigenbases and divide scales of a host inverse, on the device."""
        if isinstance(host, ExactKronSumInverse):
            return DeviceSolver([(to_device(eg.vectors), to_device(ea.vectors), to_device(eg.values), to_device(ea.values), host.alpha) for eg, ea in host.general], True)
        inner = host.inner if isinstance(host, FactoredKronSumInverse) else host
        blocks = []
        for (eg, ea), (d_g, d_a, add) in zip(inner.eigens, inner.scales):
            blocks.append((to_device(eg.vectors), to_device(ea.vectors), to_device(d_g), to_device(d_a), float(add)))
        return DeviceSolver(blocks, False)

    def _block_matrices(self, v):
        """(positions, V) per block: theta[positions] as the block's (out x k) matrix."""
        for _, _, positions, shape in self.blocks:
            yield positions, kernels.gather(v, positions).reshape(shape)

    def _apply_solver(self, solver: DeviceSolver, v):
        """P^{-1} v block by block: Q_G [(Q_G^T V Q_A) / scales] Q_A^T."""
        mm = device_ops.matmul_device
        out = kernels.empty(v.shape, v.dtype)
        for (positions, V), (q_g, q_a, row, col, scalar) in zip(self._block_matrices(v), solver.blocks):
            rotated = mm(mm(q_g, V, trans_a=True), q_a)
            divide = device_ops.kron_sum_divide_device if solver.kron_sum else device_ops.eigen_divide_device
            kernels.scatter(mm(mm(q_g, divide(rotated, row, col, scalar)), q_a, trans_b=True), positions, out)
        return out

    def _apply_factors(self, factors: tuple, v):
        """(G (x) A) v block by block: V -> G V A (the undamped K-FAC matrix of ``factors``)."""
        mm = device_ops.matmul_device
        out = kernels.empty(v.shape, v.dtype)
        for (positions, V), (p, spec, _, _) in zip(self._block_matrices(v), self.blocks):
            A = factors[p][spec.a_factor][spec.a_rows, spec.a_rows]
            kernels.scatter(mm(mm(factors[p][spec.g_factor], V), A), positions, out)
        return out

    # ---------------------------------------------------------------- correction, clips
    def _corrected_gradient(self, state: OptState, g, alpha: float, k: int):
        """ghat_k as :func:`kldwrm_ref.optim.curvature_method._corrected_gradient`, on the device."""
        spec, hyper, previous = self.spec, self.hyper, state.previous
        if spec.correction == "none" or previous is None:
            return g
        if spec.correction == "model" and hyper.correction == "authors":
            period = self.average.period
            if k > 1 and k % period == 1 % period and state.ea is not None:  # right after a refresh: Gbar V Abar
                x_term = self._apply_factors(state.ea.average, previous.direction)
            else:
                x_term = kernels.axpby(1.0 / (1.0 + previous.alpha), previous.corrected, 0.0, previous.corrected)
            c = hyper.rho * previous.alpha / alpha
            ghat = kernels.axpby(1.0, g, c, previous.corrected)
            kernels.axpby(1.0, ghat, -c, previous.gradient, ghat)
            return kernels.axpby(1.0, ghat, -c, x_term, ghat)
        if previous.model_gradient is None:
            return g
        return kernels.axpby(1.0, g, -hyper.rho * previous.alpha / alpha, previous.model_gradient)

    def _rms_factors(self, v, extra=None) -> tuple[np.ndarray, float | None]:
        """Per RMS-clip group min(1, limit / RMS) (and <v, extra> when given), from one scalars read;
        without an RMS clip only <v, extra> is computed (the factors are all 1)."""
        limit = self.hyper.rms_clip
        groups = self.groups if limit is not None else []
        scalars = kernels.zeros(len(groups) + 1, np.float64)
        for i, group in enumerate(groups):
            part = v[group]
            kernels.dot(part, part, scalars, i)
        if extra is not None:
            kernels.dot(v, extra, scalars, len(groups))
        read = to_host(scalars)
        factors = np.ones(len(self.groups))
        for i, (squared, group) in enumerate(zip(read[:-1], groups)):
            rms = math.sqrt(squared) / math.sqrt(group.stop - group.start)
            factors[i] = min(1.0, limit / rms) if limit is not None and rms > 0 else 1.0
        return factors, (float(read[-1]) if extra is not None else None)

    def _kl_factor(self, vg: float | None, alpha: float) -> float:
        assert vg is not None and self.hyper.kl_clip is not None
        vg = vg * alpha * alpha
        return min(1.0, math.sqrt(self.hyper.kl_clip / vg)) if vg > 0 else 1.0

    def _scaled(self, v, factors: np.ndarray):
        out = kernels.copy(v)
        for group, factor in zip(self.groups, factors):
            if factor != 1.0:
                kernels.scale(out[group], factor)
        return out

    def _clip(self, v, ghat_wd, alpha: float):
        """The RMS and kl clips of :func:`kldwrm_ref.optim.clipping.clip_direction`, on the device."""
        hyper, info = self.hyper, dict[str, Any]()
        joint = hyper.clip_order == "joint"
        if hyper.rms_clip is None and hyper.kl_clip is None:
            return v, info
        factors, vg = self._rms_factors(v, ghat_wd if hyper.kl_clip is not None else None)
        nu = self._kl_factor(vg, alpha) if hyper.kl_clip is not None and joint else None
        if hyper.rms_clip is not None:
            info["rms_clip_factors"] = factors
            info["rms_clip_factor"] = float(factors.min())
            v = self._scaled(v, factors)
        if hyper.kl_clip is not None:
            if not joint:
                if hyper.rms_clip is not None:
                    scalars = kernels.zeros(1, np.float64)
                    kernels.dot(v, ghat_wd, scalars, 0)
                    vg = float(to_host(scalars)[0])
                nu = self._kl_factor(vg, alpha)
            assert nu is not None
            info["kl_clip_factor"] = nu
            v = kernels.axpby(nu, v, 0.0, v)
        return v, info

    # ---------------------------------------------------------------- QE's inner solve
    def _inner_solve(self, theta_k, s_q, g, B, alpha: float, wake, X, k: int, keeps):
        """QE's momentum-SGD inner solve of E_k (:func:`kldwrm_ref.optim.qe.inner_solve`, inner="sgd");
        the wake models' logits on the batch are computed once."""
        hyper, n = self.hyper, X.shape[0]
        indices, weights = truncated_wake_weights(hyper.rho, k, hyper.m)
        kept = list(wake[-len(indices) :])
        ref_logits = [self.device_net.forward(t, X, keeps).logits for t in kept]
        scale = hyper.kappa / alpha
        proximal = hyper.total_damping if hyper.proximal else 0.0

        def gradient(s):
            theta = kernels.axpby(1.0, theta_k, 1.0, s)
            cache = self.device_net.forward(theta, X, keeps)
            total = kernels.zeros(cache.logits.shape, cache.logits.dtype)
            proximal_grad = kernels.zeros(theta.shape, theta.dtype)
            for w, ref, centre in zip(weights, ref_logits, kept):
                _, dlogits = device_ops.kl_device(ref, cache.logits, hyper.kl)
                kernels.axpby(1.0, total, float(w), dlogits, total)
                if proximal:
                    kernels.axpby(1.0, proximal_grad, w * proximal, theta, proximal_grad)
                    kernels.axpby(1.0, proximal_grad, -w * proximal, centre, proximal_grad)
            vjp = self.device_net.vjp(theta, cache, total)
            kernels.axpby(1.0 / n, vjp, 1.0, proximal_grad, vjp)
            grad = kernels.axpby(1.0, g, 1.0, self._apply_factors(B, s))
            return kernels.axpby(1.0, grad, scale, vjp, grad)

        s = kernels.copy(s_q)
        velocity = kernels.zeros(s.shape, s.dtype)
        grad = gradient(s)
        for i in range(hyper.inner_steps):
            direction = grad
            if hyper.rms_clip is not None:
                direction = self._scaled(direction, self._rms_factors(direction)[0])
            kernels.axpby(hyper.inner_momentum, velocity, hyper.inner_step_factor * alpha, direction, velocity)
            s = kernels.axpby(1.0, s, -1.0, velocity)
            if i + 1 < hyper.inner_steps:  # the host evaluates E_k once more after the last step, unused
                grad = gradient(s)
        return s


def _rebuild(template, leaves: list):
    """``template``'s tuple structure with its array leaves replaced, in order, by ``leaves``."""
    iterator = iter(leaves)

    def swap(_):
        return next(iterator)

    return _tree(swap, template)


def make_device(opt: Optimizer) -> DeviceOptimizer:
    """The device-resident twin of ``opt`` (raises ValueError naming what is not supported)."""
    return DeviceOptimizer(opt)
