"""Experiment configurations: defaults, validation and expansion into runs (``kldwrm mnist``).

An experiment is a configuration (a JSON file in ``experiments/`` or the built-in quick
comparison :data:`QUICK`) expanded into runs, one per (architecture, optimiser, seed).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from kldwrm_ref import optim
from kldwrm_ref.backends import BACKENDS, get_backend
from kldwrm_ref.model import ACTIVATIONS
from kldwrm_ref.model.zoo import NAMED_NETWORKS, arch_label, build_network, input_size
from kldwrm_ref.validation import check_choice, check_folder_name, check_positive_int

DTYPES = ("float32", "float64")
DATA_SOURCES = ("mnist", "synthetic")
MNIST_TRAIN, MNIST_SIDE = 60000, 28
SYNTHETIC_SIZES = dict(n_train=2000, n_test=500)  # the synthetic problem's defaults (data.n_train, data.n_test)
# The README's main job: K-FAC against the three KLD-WRM methods, paper preset, 2 seeds, 5 epochs.
QUICK: dict[str, Any] = dict(
    name="quick",
    description="K-FAC vs SO-, Q-, QE-KLD-WRM on MNIST, 784-256-10, authors' hyperparameters, 5 epochs, 2 seeds",
    optimizers=["kfac", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"],
    architectures=[[784, 256, 10]],
    activation="relu",
    epochs=5,
    seeds=[0, 1],
    batch=512,
    platform="kfac",
    preset="paper",
    backend="auto",
    dtype="float32",
    data=dict(source="mnist", pool=1, subset=None, n_train=None, n_test=None),
    hyper={},
    report_best_on_test=True,  # False in the tuned protocol's final stage: only final-epoch test accuracy is reported
)


class RunSpec(NamedTuple):
    """One run: an optimiser, an architecture and a seed, with everything they are trained under."""

    optimizer: str
    architecture: tuple[int, ...] | str  # MLP layer sizes, or a named network (NAMED_NETWORKS)
    activation: str
    seed: int
    epochs: int
    batch: int
    platform: str
    preset: str
    backend: str
    dtype: str
    data: dict
    hyper: dict  # overrides of the preset for this optimiser

    @property
    def label(self) -> str:
        return f"{arch_label(self.architecture)}/{self.optimizer}/seed-{self.seed}"


def read_config(path: str | os.PathLike) -> dict:
    """An experiment configuration file (a JSON object of the fields of :data:`QUICK`); errors name the file."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON configuration ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object of experiment fields, not a {type(config).__name__}")
    return config


# The JSON type each field must have (architectures and seeds are checked element by element below).
_FIELD_TYPES = dict(
    name=str, description=str, optimizers=list, architectures=list, activation=str, epochs=int, seeds=list, batch=int,
    platform=str, preset=str, backend=str, dtype=str, data=dict, hyper=dict, report_best_on_test=bool,
)


def check_fields(config: dict) -> dict:
    """``config`` if it is a dict of known fields, each of its JSON type; else ValueError naming the field."""
    if not isinstance(config, dict):
        raise ValueError(f"a configuration must be a JSON object (dict), got {type(config).__name__}")
    unknown = set(config) - set(QUICK)
    if unknown:
        raise ValueError(f"unknown configuration field(s) {sorted(unknown)}; accepted: {sorted(QUICK)}")
    for field, value in config.items():
        if not isinstance(value, _FIELD_TYPES[field]):
            raise ValueError(f"{field} must be a JSON {_FIELD_TYPES[field].__name__}, got {value!r:.60}")
    if any(not isinstance(value, dict) for value in config.get("hyper", {}).values()):
        raise ValueError("hyper must map '*' or optimiser names to objects of hyperparameters")
    return config


def validate_config(config: dict) -> dict:
    """Fill defaults from :data:`QUICK` and check every field; errors name the field."""
    check_fields(config)
    cfg = {**copy.deepcopy(QUICK), **copy.deepcopy(config)}
    cfg["data"] = {**QUICK["data"], **cfg["data"]}
    if not cfg["optimizers"]:
        raise ValueError("optimizers must name at least one of " + ", ".join(optim.NAMES))
    for name in cfg["optimizers"]:
        check_choice(name, "optimizers", optim.NAMES)
    if not cfg["architectures"]:
        raise ValueError(f"architectures must name at least one network: MLP layer sizes or one of {', '.join(NAMED_NETWORKS)}")
    for field in ("optimizers", "architectures"):
        if len(set(map(json.dumps, cfg[field]))) != len(cfg[field]):
            raise ValueError(f"{field} must be distinct (a repeated entry would be the same runs twice), got {cfg[field]!r}")
    check_choice(cfg["activation"], "activation", ACTIVATIONS)
    check_choice(cfg["platform"], "platform", optim.PLATFORMS)
    check_choice(cfg["preset"], "preset", optim.PRESETS)
    get_backend(check_choice(cfg["backend"], "backend", BACKENDS))  # "cuda": CuPy, a device and numba-cuda, before any file is written
    check_choice(cfg["dtype"], "dtype", DTYPES)
    check_positive_int(cfg["epochs"], "epochs")
    check_positive_int(cfg["batch"], "batch")
    check_folder_name(cfg["name"], "name")
    check_seeds(cfg["seeds"], "seeds")
    data = cfg["data"] = check_data(cfg["data"], cfg["batch"])
    n_inputs = 784 // data["pool"] ** 2 if data["source"] == "mnist" else None
    for sizes in cfg["architectures"]:
        if isinstance(sizes, str):
            check_choice(sizes, "architectures", tuple(NAMED_NETWORKS))
            if n_inputs is not None and input_size(sizes) != n_inputs:
                raise ValueError(f"architectures: {sizes} takes {input_size(sizes)} inputs, MNIST pooled by {data['pool']} has {n_inputs}")
            continue
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"architectures: each must be a list of >= 2 positive layer sizes or one of {', '.join(NAMED_NETWORKS)}, got {sizes!r}")
        if n_inputs is not None and sizes[0] != n_inputs:
            raise ValueError(f"architectures: input size {sizes[0]} does not match MNIST pooled by {data['pool']} ({n_inputs} inputs)")
        if sizes[-1] != 10:
            raise ValueError(f"architectures: the output layer must have 10 classes, got {sizes[-1]}")
    for key in cfg["hyper"]:
        if key != "*" and key not in optim.NAMES:
            raise ValueError(f"hyper: keys must be '*' or an optimiser name ({', '.join(optim.NAMES)}), got {key!r}")
    for name in cfg["optimizers"]:  # builds each optimiser once: rejects unknown or out-of-range hyperparameters
        optim.make(name, build_network(cfg["architectures"][0], cfg["activation"]), platform=cfg["platform"], preset=cfg["preset"], backend="numpy", **_overrides(cfg, name))
    return cfg


def check_seeds(seeds, name: str) -> list[int]:
    """A non-empty list of distinct integers >= 0 (a repeated seed would be one run counted twice)."""
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"{name} must be a non-empty list of integers >= 0, got {seeds!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"{name} must be distinct, got {seeds!r} (repeated: {', '.join(map(str, repeated))})")
    return seeds


def _optional_positive_int(value, name: str) -> int | None:
    return None if value is None else check_positive_int(value, name)


def check_data(data: dict, batch: int) -> dict:
    """The ``data`` field, checked against the sizes it gives: ``batch`` must fit in the training
    examples left after the validation split and the subset.  Returns it without a zero ``validation``."""
    data = dict(data)
    unknown = set(data) - set(QUICK["data"]) - {"validation"}
    if unknown:
        raise ValueError(f"data: unknown field(s) {sorted(unknown)}; accepted: {sorted(set(QUICK['data']) | {'validation'})}")
    check_choice(data["source"], "data.source", DATA_SOURCES)
    check_positive_int(data["pool"], "data.pool (--pool)")
    subset = _optional_positive_int(data["subset"], "data.subset (--subset)")
    validation = data.pop("validation", 0)  # absent when 0, so runs without a split keep their identity
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 0:
        raise ValueError(f"data.validation must be an integer >= 0 (training examples held out for selection), got {validation!r}")
    if data["source"] == "synthetic":
        for field, value, unset in (("pool", data["pool"], 1), ("subset", subset, None)):
            if value != unset:
                raise ValueError(f"data.{field} (--{field}) applies to MNIST only, not to the synthetic problem (--synthetic; sized by data.n_train and data.n_test), got {value}")
        n_train = _optional_positive_int(data["n_train"], "data.n_train") or SYNTHETIC_SIZES["n_train"]
        _optional_positive_int(data["n_test"], "data.n_test")
        where = f"{n_train} synthetic training examples"
    else:
        if data["n_train"] is not None or data["n_test"] is not None:
            raise ValueError(f"data.n_train and data.n_test size the synthetic problem only; MNIST takes data.subset, got n_train {data['n_train']}, n_test {data['n_test']}")
        if MNIST_SIDE % data["pool"]:
            raise ValueError(f"data.pool (--pool) must divide the MNIST image side {MNIST_SIDE} (1, 2, 4, 7, 14 or 28), got {data['pool']}")
        n_train, where = MNIST_TRAIN, f"{MNIST_TRAIN} MNIST training images"
    if not validation < n_train:
        raise ValueError(f"data.validation must be in [0, {n_train}) (of the {where}), got {validation}")
    left = n_train - validation
    if validation:
        where += f" minus {validation} held out for validation"
    if subset is not None and subset > left:
        raise ValueError(f"data.subset (--subset) must be in [1, {left}] (the {where}), got {subset}")
    if batch > (subset or left):
        size = f"the --subset of {subset}" if subset else f"the {where}"
        raise ValueError(f"batch must be in [1, {subset or left}], the training examples ({size}), got {batch}")
    if validation:
        data["validation"] = validation
    return data


def _overrides(cfg: dict, name: str) -> dict:
    return {**cfg["hyper"].get("*", {}), **cfg["hyper"].get(name, {})}


def expand(cfg: dict) -> list[RunSpec]:
    """All runs of a configuration, seed-major so that a partial sweep covers every architecture and optimiser."""
    return [
        RunSpec(name, sizes if isinstance(sizes, str) else tuple(sizes), cfg["activation"], seed, cfg["epochs"], cfg["batch"], cfg["platform"], cfg["preset"], cfg["backend"], cfg["dtype"], dict(cfg["data"]), _overrides(cfg, name))
        for seed in cfg["seeds"]
        for sizes in cfg["architectures"]
        for name in cfg["optimizers"]
    ]


