"""Tensor parallelism over Ray: rank 0 runs in this process beside the scheduler, ranks
1..N-1 are Ray actors in a placement group (one CPU each here, one GPU each on a GPU cluster).

Ray places, starts, watches and stops the ranks; it carries no per-step traffic. The ranks
form one `torch.distributed` group (Gloo on CPU, NCCL on GPU): rank 0 broadcasts each step
over it (engine/parallel.py's wire format) and the other ranks loop on receiving, so a step
costs two broadcasts plus the model's own all-reduces. Every collective has a timeout; while
the engine is idle rank 0 sends a keep-alive so that the ranks' waits never reach it. If a
rank dies, the next step (or the watcher, when idle) fails with `TensorParallelError` and
every rank is stopped.

A process that a launcher started inside a placement group it holds (deploy/ray_replicas.py)
finds the group's id in $PAGEDSERVE_PLACEMENT_GROUP: bundle 0 is this process's, and ranks
1..N-1 take bundles 1..N-1 of that group instead of a group of their own.

Only this module imports Ray, and only when an engine with tensor_parallel_size > 1 starts.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.model_loader import LoadedModel, check_tensor_parallel, load_model
from pagedserve.engine.model_runner import ModelRunner
from pagedserve.engine.parallel import (
    NOOP,
    STOP,
    ParallelContext,
    StepInput,
    TensorParallelError,
    control_header,
    empty_header,
    pack_step,
    unpack_step,
)

logger = logging.getLogger(__name__)

_PLACEMENT_TIMEOUT = 30.0  # seconds to wait for Ray to place the ranks' bundles
_START_TIMEOUT = 300.0  # seconds for the placed ranks' processes to start (import torch, ...)
_WATCH_INTERVAL = 0.5  # seconds between the watcher's looks at the ranks
PLACEMENT_GROUP_ENV = "PAGEDSERVE_PLACEMENT_GROUP"  # the hex id of a group handed to us


class TensorParallelExecutor:
    """Starts the ranks, owns rank 0's `ModelRunner` (`runner`, with `loaded`), sends each
    step to the other ranks (it is the runner's `channel`) and stops them all."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.size = config.tensor_parallel_size
        self.timeout = config.distributed_timeout
        self.workers: list = []  # Ray actor handles, rank 1 first
        self.rank_info: list[dict] = []  # what each rank loaded (rank 0 first)
        self.failure: str | None = None
        self.loaded: LoadedModel | None = None
        self.runner: ModelRunner | None = None
        self._loops: list = []  # each worker's `serve` call: done only when it stops
        self._placement = None
        self._owns_placement = False
        self._owns_ray = False
        self._closed = False
        self._control = None  # the step messages' group (Gloo) when the ranks' is NCCL
        self._lock = threading.Lock()  # one sender at a time: steps and keep-alives
        self._last_send = time.monotonic()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

        # Everything that can be refused without starting anything, first.
        if dist.is_initialized():
            raise ValueError(
                "this process already runs a tensor-parallel engine; shut it down first"
            )
        check_tensor_parallel(config)
        self.device = config.torch_device
        if config.ray_address is None:
            _check_local_devices(self.size, self.device)
        else:
            _check_reachable(config.ray_address)
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # --- start ----------------------------------------------------------------------------
    def _start(self) -> None:
        ray = _import_ray()
        if ray.is_initialized() and self.config.ray_address is not None:
            logger.warning("ray_address is ignored: this process is connected to Ray already")
        if not ray.is_initialized():
            self._owns_ray = True
            try:
                if self.config.ray_address is None:  # "local": never join a running one
                    ray.init(
                        address="local", include_dashboard=False, logging_level=logging.WARNING
                    )
                else:
                    ray.init(address=self.config.ray_address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                hint = ""
                if "RAY_AUTH_MODE" not in os.environ:
                    hint = " (a cluster with token authentication needs RAY_AUTH_MODE=token here)"
                raise ValueError(
                    f"cannot join the Ray cluster at {self.config.ray_address!r}: {e}{hint}"
                ) from e
        self._check_cluster()
        gpu = self.device.type == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        handed = os.environ.get(PLACEMENT_GROUP_ENV)
        if handed:  # bundle 0 is held by our launcher's actor, this process's parent
            self._placement, first = _handed_placement_group(ray, handed, self.size), 1
        else:
            # On GPU rank 0 takes bundle 0's GPU; on CPU it runs on this process's own cores.
            first = 1 if gpu else 0
            self._placement = ray.util.placement_group(
                [bundle] * (self.size - 1 + first), strategy="PACK"
            )
            self._owns_placement = True
        try:
            ray.get(self._placement.ready(), timeout=_PLACEMENT_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise ValueError(
                f"Ray could not place {self.size - 1 + first} rank(s) of {bundle} within "
                f"{_PLACEMENT_TIMEOUT:.0f}s; the cluster has {_resources(ray)} in all"
            ) from None
        if gpu and not handed:  # a handed group's actor holds bundle 0's GPU: it is ours
            self._take_driver_gpu(ray)

        # Rank 0 listens for the others: on loopback unless the ranks may sit on other nodes.
        one_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1
        host = "127.0.0.1" if one_node else ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{_free_port(host)}"
        strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy
        actor = ray.remote(RankWorker)
        for rank in range(1, self.size):
            if handed:  # the launcher's bundles say what a rank holds
                bundle = self._placement.bundle_specs[rank]
            options = dict(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=strategy(self._placement, rank - 1 + first),
            )
            self.workers.append(
                actor.options(**options).remote(self.config, rank, init_method, os.nice(0))  # type: ignore[attr-defined]
            )
        try:  # started, before any collective: a slow start must not time the rendezvous out
            ray.get([w.pid.remote() for w in self.workers], timeout=_START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise TensorParallelError(
                f"the ranks' processes did not start within {_START_TIMEOUT:.0f}s"
            ) from None
        # Join the group and load, every rank at once; loading runs no collective, so a slow
        # rank's load cannot time one out. Then the runners, whose KV budgets meet in one.
        calls = [w.load.remote() for w in self.workers]
        ctx = ParallelContext(0, self.size)
        try:
            self._control = _init_process_group(self.config, ctx, init_method)
            self.loaded = load_model(self.config, ctx)
            ray.get(calls)
            calls = [w.make_runner.remote() for w in self.workers]
            self.runner = ModelRunner(self.config, self.loaded, ctx)
            infos = ray.get(calls, timeout=self.timeout)
        except Exception as e:
            cause = _worker_error(ray, calls)  # a rank's own error explains rank 0's
            if cause is None:
                raise
            raise cause from e
        self.rank_info = [_rank_info(0, self.loaded, self.runner), *infos]
        self._loops = [w.serve.remote() for w in self.workers]
        self.runner.channel = self
        self._watcher = threading.Thread(target=self._watch, name="tp-watcher", daemon=True)
        self._watcher.start()
        logger.info(
            "tensor parallelism: %d ranks (%s), %d KV blocks each",
            self.size, dist.get_backend(), self.runner.num_blocks,
        )  # fmt: skip

    def _check_cluster(self) -> None:
        ray = _import_ray()
        total = ray.cluster_resources()
        kind = "GPU" if self.device.type == "cuda" else "CPU"
        if total.get(kind, 0) < self.size:
            raise ValueError(
                f"tensor_parallel_size {self.size} needs {self.size} {kind}s, one a rank; "
                f"the Ray cluster has {int(total.get(kind, 0))}"
            )

    def _take_driver_gpu(self, ray) -> None:
        """Rank 0 runs here, on the GPU Ray reserved in bundle 0 (it must be on this node)."""
        strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy
        probe = ray.remote(num_gpus=1, num_cpus=0)(_gpu_and_node).options(
            scheduling_strategy=strategy(self._placement, 0)
        )
        gpu_ids, node = ray.get(probe.remote(), timeout=self.timeout)
        if node != ray.util.get_node_ip_address() or not gpu_ids:
            raise ValueError(
                "rank 0 runs in this process, but Ray placed its GPU on another node; "
                "start the engine on a node of the cluster that has a free GPU"
            )
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        physical = str(gpu_ids[0])
        index = visible.split(",").index(physical) if visible else int(physical)
        torch.cuda.set_device(index)

    # --- the step channel (rank 0's side) -------------------------------------------------
    @contextlib.contextmanager
    def step(self, step: StepInput) -> Iterator[None]:
        """Broadcast `step`; the block runs rank 0's share while the others run theirs. Any
        error in between leaves the ranks out of step, so it stops them all."""
        with self._lock:
            if self.failure is not None:
                raise TensorParallelError(self.failure)
            try:
                header, payload = pack_step(step)
                self._broadcast(header)
                self._broadcast(payload)
                yield
            except Exception as e:
                raise self._fail(f"a tensor-parallel step failed: {_first_line(e)}") from e
            finally:
                self._last_send = time.monotonic()

    def _broadcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=0, group=self._control)

    # --- failure and keep-alive -----------------------------------------------------------
    def _watch(self) -> None:
        """Notice a rank that stops while the engine is idle, and keep the ranks' waits for
        the next step under the collective timeout."""
        ray = _import_ray()
        keepalive = self.timeout / 4
        while not self._stop.is_set():
            done, _ = ray.wait(self._loops, num_returns=1, timeout=_WATCH_INTERVAL)
            if self._stop.is_set():
                return
            if done:
                self._fail("a tensor-parallel rank stopped")
                return
            if time.monotonic() - self._last_send > keepalive and self._lock.acquire(False):
                try:
                    self._broadcast(control_header(NOOP))
                    self._last_send = time.monotonic()
                except Exception as e:
                    self._fail(f"a keep-alive to the ranks failed: {_first_line(e)}")
                    return
                finally:
                    self._lock.release()

    def _fail(self, what: str) -> TensorParallelError:
        """Record the failure (naming the rank that died, where Ray knows) and stop the
        other ranks; returns the error to raise."""
        if self.failure is None:
            self.failure = f"{what}{self._dead_ranks()}; the engine has stopped all its ranks"
            logger.error("%s", self.failure)
            self._kill_workers()
        return TensorParallelError(self.failure)

    def _dead_ranks(self) -> str:
        ray = _import_ray()
        done, _ = ray.wait(self._loops, num_returns=len(self._loops), timeout=1.0)
        dead = []
        for ref in done:
            rank = self._loops.index(ref) + 1
            try:
                ray.get(ref, timeout=0)
                dead.append(f"rank {rank} exited")
            except Exception as e:
                dead.append(f"rank {rank} died ({type(e).__name__}: {_first_line(e)})")
        return f" ({'; '.join(dead)})" if dead else ""

    @property
    def is_healthy(self) -> bool:
        return self.failure is None and not self._closed

    # --- stop -----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every rank, the placement group, and Ray if this engine started it. Safe to
        call more than once and after a failure."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        ray = _import_ray() if (self.workers or self._owns_ray or self._placement) else None
        if self._loops and self.failure is None and self._lock.acquire(timeout=self.timeout):
            try:  # let the ranks leave their loop and the process group cleanly
                self._broadcast(control_header(STOP))
                ray.wait(self._loops, num_returns=len(self._loops), timeout=5)
            except Exception:
                logger.warning("a rank did not take the stop message; killing it")
            finally:
                self._lock.release()
        self._kill_workers()
        if self._placement is not None and self._owns_placement:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self._placement)
        _destroy_process_group()
        self._control = None
        if self._owns_ray and ray is not None:
            ray.shutdown()
        logger.info("tensor-parallel ranks stopped")

    def _kill_workers(self) -> None:
        if not self.workers:
            return
        ray = _import_ray()
        for worker in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(worker, no_restart=True)


class RankWorker:
    """Rank 1..N-1, as a Ray actor: join the process group and load this rank's shard, build
    its runner (KV cache), then run every step rank 0 broadcasts until it says stop."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str, niceness: int):
        self.config, self.init_method = config, init_method
        self.ctx = ParallelContext(rank, config.tensor_parallel_size)
        self.loaded: LoadedModel | None = None
        self.runner: ModelRunner | None = None
        self.control = None  # the step messages' group (Gloo) when the ranks' is NCCL
        # Ray lowers its workers' priority (nice 15); a rank that every step waits for should
        # run at rank 0's. Raising priority may need privileges: then it stays as Ray set it.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, niceness)

    def pid(self) -> int:
        return os.getpid()

    def load(self) -> None:
        try:
            self.control = _init_process_group(self.config, self.ctx, self.init_method)
            self.loaded = load_model(self.config, self.ctx)
        except BaseException:
            _destroy_process_group()  # rank 0 then fails at once instead of timing out
            raise

    def make_runner(self) -> dict:
        try:
            self.runner = ModelRunner(self.config, self.loaded, self.ctx)
            return _rank_info(self.ctx.rank, self.loaded, self.runner)
        except BaseException:
            _destroy_process_group()
            raise

    def serve(self) -> str:
        device = self.runner.device
        try:
            with torch.inference_mode():
                while True:
                    header = empty_header()
                    dist.broadcast(header, src=0, group=self.control)
                    kind = int(header[0])
                    if kind == STOP:
                        return "stopped"
                    if kind == NOOP:
                        continue
                    payload = torch.empty(int(header[-1]), dtype=torch.long)
                    dist.broadcast(payload, src=0, group=self.control)
                    self.runner.run_step(unpack_step(header, payload, device))
        finally:
            _destroy_process_group()
            self.control = None


# --- helpers --------------------------------------------------------------------------------
def _init_process_group(config: EngineConfig, ctx: ParallelContext, init_method: str):
    """Join the ranks' group; returns the group for the step messages: a Gloo group of its
    own when the ranks' is NCCL (which carries only the model's collectives), else None (the
    default group)."""
    device = config.torch_device
    timeout = datetime.timedelta(seconds=config.distributed_timeout)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=init_method,
        rank=ctx.rank, world_size=ctx.size, timeout=timeout,
    )  # fmt: skip
    return dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else None


def _destroy_process_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _rank_info(rank: int, loaded: LoadedModel, runner: ModelRunner) -> dict:
    return {
        "rank": rank,
        "pid": os.getpid(),
        "num_blocks": runner.num_blocks,
        "param_shapes": _param_shapes(loaded.model),
        "reads": list(loaded.reads),
    }


def _param_shapes(model) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape; a linear weight packed for a CPU matmul (its plain copy freed)
    by the packed weight's logical shape."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        packed = getattr(module, "packed", None)
        if packed is not None and f"{name}.weight" in shapes:
            shapes[f"{name}.weight"] = tuple(packed.shape)
    return shapes


def _worker_error(ray, calls: list) -> BaseException | None:
    """The exception a rank's start-up call raised, if one did (it explains rank 0's)."""
    done, _ = ray.wait(calls, num_returns=len(calls), timeout=2.0)
    for ref in done:
        try:
            ray.get(ref, timeout=0)
        except Exception as e:
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, BaseException) else e
    return None


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls home
    try:
        import ray
        import ray.util.scheduling_strategies
    except ImportError as e:
        raise ValueError("tensor_parallel_size > 1 needs Ray: pip install 'pagedserve[tp]'") from e
    return ray


def _handed_placement_group(ray, group_id: str, size: int):
    """The placement group `group_id` (hex) that our launcher holds: one bundle a rank."""
    from ray.util.placement_group import PlacementGroup

    try:
        group = PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
        bundles = len(group.bundle_specs)
    except Exception as e:
        raise ValueError(f"${PLACEMENT_GROUP_ENV}: no placement group {group_id!r}: {e}") from e
    if bundles != size:
        raise ValueError(
            f"${PLACEMENT_GROUP_ENV}: the placement group has {bundles} bundle(s), "
            f"tensor_parallel_size is {size}: one bundle a rank"
        )
    return group


def _check_local_devices(size: int, device: torch.device) -> None:
    if device.type == "cuda":
        have, kind = torch.cuda.device_count(), "GPU"
    else:
        have, kind = len(os.sched_getaffinity(0)), "CPU"
    if size > have:
        raise ValueError(
            f"tensor_parallel_size {size} needs {size} {kind}s, one a rank; this machine has "
            f"{have} (pass --ray-address to use a Ray cluster's)"
        )


def _check_reachable(address: str) -> None:
    """Refuse a cluster address that nothing answers on, at once (Ray itself retries for a
    long time). 'auto' and ray:// client addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray_address must be HOST:PORT (or 'auto'), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as e:
        raise ValueError(f"no Ray cluster answers at {address!r}: {e}") from e


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _resources(ray) -> str:
    total = ray.cluster_resources()
    return ", ".join(f"{int(total[k])} {k}" for k in ("CPU", "GPU") if k in total) or "nothing"


def _gpu_and_node():
    import ray

    return ray.get_gpu_ids(), ray.util.get_node_ip_address()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""
