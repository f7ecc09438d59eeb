"""Past one machine: linalign's own engine, replicated on Ray (the `ray` extra: pip install 'linalign[ray]').

Each replica is one process with its own `Aligner`, decoding its batches with linalign's own batching; Ray
places the replicas and moves work and results. Nothing here splits a model or a sequence pair across
processes: a pair's two contexts always decode in one engine, in lock-step.

- Batch jobs (`linalign generate --input ... --ray`): the job is planned as on one machine
  (`linalign.jobs.plan`), Ray Data takes the planned batches (one row each), `map_batches` runs them on a pool
  of actors that each hold one `Aligner`, loaded once, and the driver writes each batch's records as it
  arrives, so the resume rule of the local job holds whoever dies.
- Evaluations (`linalign eval --ray`): the same with a pool of actors that generate and score.
- Serving (`linalign serve --ray`): `linalign.serve.replicas`, on the cluster this module starts or joins.

A local cluster started here runs on a loopback address with no dashboard, and Ray's usage statistics are off
unless the environment turns them on. On Linux that address is 127.0.0.2: Ray replaces 127.0.0.1 given as a
node's address with the machine's network address (so that other machines could reach it), and the rest of
the loopback range is left as it is. Ray's own servers (GCS, raylet) listen on every interface whatever the
node's address; they are reached on the node's address only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import pickle
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from linalign.errors import LinalignError
from linalign.jobs import Batch, Executor, JobSettings, Result, capped_aligner, load_aligner, run_batch

# Where Ray does not rewrite 127.0.0.1 (macOS and Windows, where it makes no multi-node clusters), 127.0.0.1.
LOOPBACK = "127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1"


@dataclass
class RayPlacement:
    """Where the replicas run: `address` None starts a local cluster; each replica reserves its CPUs and GPUs."""

    address: str | None = None
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise LinalignError(f"--replicas must be an integer >= 1, got {self.replicas!r}")
        if not self.cpus_per_replica > 0:
            raise LinalignError(f"--cpus-per-replica must be > 0, got {self.cpus_per_replica!r}")
        if not self.gpus_per_replica >= 0:
            raise LinalignError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica!r}")

    @property
    def threads(self) -> int:
        """Decoding threads in a replica: its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_replica))


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no report leaves the machine unless asked for
    try:
        import ray
    except ImportError:
        raise LinalignError("--ray needs Ray: pip install 'linalign[ray]'") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a 'HOST:PORT' address; None for Ray's other forms ('auto', 'ray://...')."""
    if "://" in address or address == "auto":
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise LinalignError(f"a Ray address is HOST:PORT (the head's GCS port, 6379 by default), got {address!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, with one sentence, where nothing listens at `address` (Ray itself retries for a minute)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LinalignError(
            f"no Ray cluster answers at {address} ({reason}); start one with `ray start --head` or check the address"
        ) from None


@contextmanager
def ray_cluster(address: str | None) -> Iterator[Any]:
    """Ray, connected: to a new local cluster on loopback (`address` None, stopped on exit) or to the cluster
    at `address` (left running)."""
    ray = _import_ray()
    if ray.is_initialized():  # a caller that set Ray up itself (a notebook, a test) keeps its own
        yield ray
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, **kwargs)
    else:
        check_reachable(address)
        target = _host_port(address)
        if target is not None and _is_loopback(target[0]):
            kwargs["_node_ip_address"] = target[0]  # a cluster on loopback: this driver joins its node there
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LinalignError(f"could not join the Ray cluster at {address}: {first}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def check_capacity(ray, placement: RayPlacement) -> None:
    """Refuse replicas the cluster cannot place at all, instead of waiting for them forever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": placement.cpus_per_replica, "GPU": placement.gpus_per_replica}
    for kind, amount in need.items():
        largest = max((n.get(kind, 0.0) for n in nodes), default=0.0)
        if amount > largest:
            raise LinalignError(
                f"a replica asks for {amount:g} {kind}s, but the largest node of the cluster has {largest:g}"
            )
    slots = sum(min(n.get(k, 0.0) // v for k, v in need.items() if v > 0) for n in nodes)
    if placement.replicas > slots:
        raise LinalignError(
            f"{placement.replicas} replicas of {need['CPU']:g} CPUs and {need['GPU']:g} GPUs each do not fit "
            f"the cluster: it has room for {int(slots)}"
        )


class JobReplica:
    """One Ray Data actor: one `Aligner`, loaded once; each row it is given is one planned batch (JSON)."""

    def __init__(self, settings: dict, threads: int) -> None:
        self.job = JobSettings(**settings)
        self.aligner = load_aligner(self.job, threads=threads)

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        results = [json.dumps(run_batch(self.aligner, self.job, json.loads(b))) for b in rows["batch"]]
        return {"result": np.array(results, dtype=object)}


def ray_executor(
    settings: JobSettings, placement: RayPlacement, status: Callable[[str], Any] = lambda _: None
) -> Executor:
    """The planned batches on `placement.replicas` Ray actors; results come back as each batch finishes."""
    if placement.gpus_per_replica > 0 and settings.device == "cpu":
        raise LinalignError("--gpus-per-replica needs a GPU device: add --device cuda")

    def execute(batches: list[Batch]) -> Iterator[Result]:
        if not batches:
            return
        where = placement.address or f"a local Ray cluster on {LOOPBACK}"
        status(f"starting {placement.replicas} replica(s) of {settings.model} on {where}")
        payloads = [json.dumps(b, ensure_ascii=False) for b in batches]
        replica = {"settings": asdict(settings), "threads": placement.threads}
        for result in on_replicas(placement, JobReplica, replica, payloads):
            yield json.loads(result)

    return execute


def on_replicas(placement: RayPlacement, replica: type, arguments: dict, payloads: list) -> Iterator[Any]:
    """Each payload through one call of a pool of `replica(**arguments)` actors (Ray Data `map_batches`, one
    payload a block and a call), the results in the order they finish."""
    with ray_cluster(placement.address) as ray:
        import ray.data
        from ray.data import ActorPoolStrategy

        check_capacity(ray, placement)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the caller's own bar counts records
        context.print_on_execution_start = False
        rows = [{"batch": p} for p in payloads]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            replica,
            batch_size=1,
            batch_format="numpy",
            fn_constructor_kwargs=arguments,
            compute=ActorPoolStrategy(size=placement.replicas),
            num_cpus=placement.cpus_per_replica,
            num_gpus=placement.gpus_per_replica,
        )
        for row in dataset.iter_rows():
            yield row["result"]


class EvalReplica:
    """One Ray Data actor of `eval --ray`: the model (and reward model), loaded once; each call evaluates one
    batch of tasks under one run (a pickled `Unit`), as `eval` does in one process, and returns its records."""

    def __init__(self, model: dict, reward_model: str | None, settings: bytes, fluency: bool, threads: int) -> None:
        from linalign.evaluation.judges import RewardModel
        from linalign.evaluation.runner import local_evaluator

        aligner = capped_aligner(threads, **model)
        scorer = RewardModel(reward_model, device=model.get("device", "cpu")) if reward_model else None
        self.evaluate = local_evaluator(aligner, pickle.loads(settings), fluency, scorer)

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        results = [json.dumps(list(self.evaluate([pickle.loads(p)]))[0]) for p in rows["batch"]]
        return {"result": np.array(results, dtype=object)}


def expected_kernel(model: str, backend: str, device: str, dtype: str) -> str:
    """The decode kernel `eval` records with its results (`EvalSettings.kernel`), decided without loading the
    model here: "llamacpp", or the matrix-product form for the device and dtype (float32 for dtype "auto")."""
    import torch

    from linalign.kernels import describe
    from linalign.models import pick_backend, resolve

    if pick_backend(backend, resolve(model)) == "llamacpp":
        return "llamacpp"
    kind = getattr(torch, dtype, torch.float32) if dtype != "auto" else torch.float32
    return describe(torch.device("cpu" if device == "auto" else device), kind)


def ray_evaluator(placement: RayPlacement, model: dict, reward_model: str | None, settings, fluency: bool):
    """`eval --ray`: the evaluation's batches on Ray replicas, scoring (checks, perplexity, reward) where the
    model is; the records come back to the driver as each batch finishes."""
    if placement.gpus_per_replica > 0 and model.get("device", "cpu") == "cpu":
        raise LinalignError("--gpus-per-replica needs a GPU device: add --device cuda")

    def execute(units: list) -> Iterator[list[dict]]:
        if not units:
            return
        arguments = {"model": model, "reward_model": reward_model, "settings": pickle.dumps(settings)}
        arguments |= {"fluency": fluency, "threads": placement.threads}
        for result in on_replicas(placement, EvalReplica, arguments, [pickle.dumps(u) for u in units]):
            yield json.loads(result)

    return execute
