"""The serving process of `pagedserve serve --config`: it starts the stack a file describes and
keeps it the way the operator asks.

- It starts the controller, the gateway and the arena as local processes, and each model's
  replicas through a `Launcher` (local processes, or Ray actors across a cluster).
- It restarts what crashes, after 1, 2, 4 ... 30 s; five crashes of one replica within five
  minutes are reported as a crash loop (it goes on retrying every 30 s).
- It scales a model up (launch, wait until ready) or down (the least-loaded replicas are drained
  at the controller, so no new request reaches them, then stopped with SIGTERM, on which a
  worker lets its requests in flight finish).
- SIGINT or SIGTERM stops everything: every process at once gets SIGTERM, whatever is left after
  `STOP_TIMEOUT` gets SIGKILL; a second signal kills at once. Children die with it (Linux's
  parent-death signal) if it is killed outright.

Its admin HTTP API (`admin_api.py`) and an autoscaler (`autoscaler.py`) call the same methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from pagedserve.deploy.replicas import (
    Launcher,
    LaunchError,
    LocalLauncher,
    Replica,
    WorkerLaunch,
    bindable,
)
from pagedserve.deploy.stack import LocalStack, Service
from pagedserve.deploy.stack_config import ModelSection, StackConfig
from pagedserve.engine.config import flag

logger = logging.getLogger(__name__)

TICK = 0.5  # seconds between looks at every process
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
CRASH_LOOP_COUNT, CRASH_WINDOW = 5, 300.0
READY_TIMEOUT = 600.0  # a replica not ready by then is stopped and counted as a crash
STOP_TIMEOUT = 40.0  # above a worker's 30 s drain
HEARTBEAT_INTERVAL = 2.0  # the supervisor's workers report load often: autoscaling reads it


class SupervisorError(Exception):
    """A request the supervisor refuses; `status` is the HTTP status the admin API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ManagedReplica:
    """One replica of a model as the supervisor tracks it, across restarts (same id)."""

    replica_id: str
    model: str
    handle: Replica | None = None
    # starting -> ready -> draining -> stopping; backoff / crash-loop while waiting to restart
    state: str = "starting"
    started_at: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    crashes: deque[float] = field(default_factory=deque)


@dataclass
class ModelGroup:
    spec: ModelSection
    target: int
    replicas: dict[str, ManagedReplica] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_index: int = 0

    def new_replica_id(self) -> str:
        self.next_index += 1
        return f"{self.spec.name}-{self.next_index - 1}"

    def live(self) -> list[ManagedReplica]:
        """Replicas that count towards the target: all but those being stopped."""
        return [r for r in self.replicas.values() if r.state not in ("draining", "stopping")]


class Supervisor:
    def __init__(self, config: StackConfig, launcher: Launcher) -> None:
        self.config = config
        self.launcher = launcher
        self.stack = LocalStack(
            host=config.controller.host,
            controller_port=config.controller.port,
            gateway_port=config.gateway.port,
            ui_port=config.arena.port,
            log_dir=config.log_dir,
        )
        self.controller_url = local_url(config.controller.host, config.controller.port)
        self.admin_url = local_url(config.admin.host, config.admin.port)
        self.models: dict[str, ModelGroup] = {}
        self.stopping = asyncio.Event()
        self.autoscalers: dict[str, Any] = {}  # model -> Autoscaler (autoscaler.py)
        headers = {}
        if config.control_token:
            headers["Authorization"] = f"Bearer {config.control_token}"
        self.client = httpx.AsyncClient(timeout=5.0, headers=headers)
        self._service_crashes: dict[str, deque[float]] = {}
        self._service_restart_at: dict[str, float] = {}

    # --- the child processes' environment ------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        token = self.config.control_token
        return {"PAGEDSERVE_CONTROL_TOKEN": token} if token else {}

    # --- start ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Controller first (workers register with it), then every model's replicas and the
        gateway; the arena once the models are ready (it offers what the gateway lists)."""
        cfg = self.config
        controller_args = ["--routing-policy", cfg.controller.routing_policy]
        if cfg.controller.redis_url:
            controller_args += ["--redis-url", cfg.controller.redis_url]
        controller = self._start_service(
            ["controller", *controller_args], cfg.controller.host, cfg.controller.port, "/health"
        )
        await self._wait_healthy(controller, 60)
        for spec in cfg.models:
            await self.add_model(spec, wait=False)
        gateway_args = ["gateway", "--controller-address", self.controller_url,
                        "--routing-policy", cfg.gateway.routing_policy,
                        "--supervisor-url", self.admin_url,
                        "--cold-start-timeout", str(cfg.gateway.cold_start_timeout)]  # fmt: skip
        if cfg.gateway.api_keys:
            gateway_args += ["--api-keys", str(cfg.gateway.api_keys)]
        if cfg.gateway.redis_url:
            gateway_args += ["--redis-url", cfg.gateway.redis_url]
        gateway = self._start_service(gateway_args, cfg.gateway.host, cfg.gateway.port, "/health")
        await self._wait_healthy(gateway, 60)
        await self.wait_ready([r for g in self.models.values() for r in g.live()], READY_TIMEOUT)
        if cfg.arena.enabled:
            names = ",".join(n for m in cfg.models for n in m.names)
            arena_args = ["ui", "--gateway-url", self.stack.gateway_url, "--db", str(cfg.arena.db),
                          "--max-tokens", str(cfg.arena.max_tokens), "--models", names]  # fmt: skip
            arena = self._start_service(arena_args, cfg.arena.host, cfg.arena.port, "/health")
            await self._wait_healthy(arena, 120)

    def _start_service(self, args: list[str], host: str, port: int, ready_path: str) -> Service:
        """`pagedserve <args> --host H --port P` as part of the stack (stopped with it)."""
        argv = [
            sys.executable,
            "-m",
            "pagedserve.deploy.cli",
            *args,
            "--host",
            host,
            "--port",
            str(port),
        ]
        name = args[0]
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        service = Service(name, argv, f"http://{host}:{port}{ready_path}",
                          self.config.log_dir / f"{name}.log", env=self.env)  # fmt: skip
        return self.stack.start(service)

    async def _wait_healthy(self, service: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not service.alive():
                raise RuntimeError(f"the {service.name} exited at start; see {service.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self.client.get(service.ready_url)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
        raise TimeoutError(
            f"the {service.name} was not up within {timeout:.0f}s; see {service.log_path}"
        )

    # --- models ---------------------------------------------------------------------------
    async def add_model(self, spec: ModelSection, wait: bool = True) -> ModelGroup:
        """Serve a model not served yet, at `spec.replicas` replicas."""
        names = {n for g in self.models.values() for n in g.spec.names}
        taken = sorted(names & set(spec.names))
        if taken:
            raise SupervisorError(409, f"model name(s) {', '.join(taken)} are served already")
        group = ModelGroup(spec, target=spec.replicas)
        self.models[spec.name] = group
        if spec.autoscale is not None:
            from pagedserve.deploy.autoscaler import Autoscaler

            self.autoscalers[spec.name] = Autoscaler(spec.autoscale, self.client)
        await self.scale(spec.name, spec.replicas, wait=wait)
        return group

    def group(self, model: str) -> ModelGroup:
        for group in self.models.values():
            if model in group.spec.names:
                return group
        known = ", ".join(sorted(self.models)) or "none"
        raise SupervisorError(404, f"unknown model {model!r}; served: {known}")

    async def scale(self, model: str, replicas: int, wait: bool = True) -> list[ManagedReplica]:
        """Set a model's replica count. Up: launch, and with `wait` return once every new one
        is ready. Down: drain the least-loaded, then stop them (always waited for)."""
        group = self.group(model)
        spec = group.spec
        if replicas < 0:
            raise SupervisorError(400, f"replicas must be 0 or more; got {replicas}")
        if spec.max_replicas is not None and not spec.min_replicas <= replicas <= spec.max_replicas:
            raise SupervisorError(
                400,
                f"{spec.name} autoscales between {spec.min_replicas} and {spec.max_replicas} "
                f"replicas; {replicas} is outside (change autoscale in the stack file)",
            )
        async with group.lock:
            group.target = replicas
            live = group.live()
            if len(live) < replicas:
                new = [self._start_replica(group) for _ in range(replicas - len(live))]
                if wait:
                    await self.wait_ready(new, READY_TIMEOUT)
                return new
            if len(live) > replicas:
                victims = await self._least_loaded(live, len(live) - replicas)
                await asyncio.gather(*(self._retire(group, r) for r in victims))
                return victims
            return []

    def _start_replica(self, group: ModelGroup) -> ManagedReplica:
        replica = ManagedReplica(group.new_replica_id(), group.spec.name)
        group.replicas[replica.replica_id] = replica
        self._launch(group, replica)
        return replica

    def _launch(self, group: ModelGroup, replica: ManagedReplica) -> None:
        """Start (or restart) a replica's process. From the event loop's thread: a local child's
        parent-death signal is tied to the thread that starts it."""
        replica.state, replica.started_at = "starting", time.monotonic()
        try:
            replica.handle = self.launcher.launch(self._worker_launch(group.spec, replica))
        except LaunchError as e:
            logger.error("cannot start %s: %s", replica.replica_id, e)
            self._crashed(replica, None)
            return
        logger.info("started %s at %s on %s", replica.replica_id, replica.handle.address,
                    replica.handle.node)  # fmt: skip

    def _worker_launch(self, spec: ModelSection, replica: ManagedReplica) -> WorkerLaunch:
        args = ["--model-path", spec.model_path, "--model-names", ",".join(spec.names),
                "--controller-address", self.controller_url,
                "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
                "--tensor-parallel-size", str(spec.tensor_parallel_size)]  # fmt: skip
        if spec.chat_template:
            args += ["--chat-template", spec.chat_template]
        engine = dict(spec.engine)
        if self.config.cpu_threads_per_worker and "cpu_threads" not in engine:
            engine["cpu_threads"] = self.config.cpu_threads_per_worker
        args += engine_args(engine)
        return WorkerLaunch(
            replica_id=replica.replica_id,
            model_name=spec.name,
            args=args,
            env=self.env,
            tensor_parallel_size=spec.tensor_parallel_size,
            gpu=engine.get("device") == "cuda",
        )

    async def wait_ready(self, replicas: list[ManagedReplica], timeout: float) -> None:
        """Until each replica is ready (the supervisor's loop checks), or one is given up on."""
        deadline = time.monotonic() + timeout
        while any(r.state != "ready" for r in replicas):
            failed = [r for r in replicas if r.state == "crash-loop"]
            if failed:
                raise SupervisorError(
                    500,
                    f"{failed[0].replica_id} keeps crashing; see its log in {self.config.log_dir}",
                )
            if time.monotonic() > deadline:
                raise SupervisorError(504, f"replicas not ready within {timeout:.0f}s")
            await self.tick_replicas(replicas)
            await asyncio.sleep(0.2)

    async def _least_loaded(self, live: list[ManagedReplica], count: int) -> list[ManagedReplica]:
        """Those not serving yet first (nothing to drain), then the least work in flight."""
        loads = {w["worker_id"]: w for w in await self.controller_workers()}

        def work(r: ManagedReplica) -> tuple[int, int]:
            w = loads.get(r.replica_id)
            if r.state != "ready" or w is None:
                return (0, 0)
            return (1, w["queue_length"] + w["running"] + w["waiting"])

        return sorted(live, key=work)[:count]

    async def _retire(self, group: ModelGroup, replica: ManagedReplica) -> None:
        """Drain, stop, forget: no new requests from now, those in flight finish."""
        replica.state = "draining"
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(f"{self.controller_url}/workers/{replica.replica_id}/drain")
        replica.state = "stopping"
        await self._stop_handle(replica)
        group.replicas.pop(replica.replica_id, None)
        logger.info("stopped %s", replica.replica_id)

    async def _stop_handle(self, replica: ManagedReplica) -> None:
        handle, replica.handle = replica.handle, None
        if handle is None:
            return
        handle.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        while await asyncio.to_thread(handle.poll) is None:
            if time.monotonic() > deadline:
                logger.warning(
                    "%s did not stop in %.0fs: killing it", replica.replica_id, STOP_TIMEOUT
                )
                handle.kill()
                await asyncio.to_thread(handle.wait, 10.0)
                break
            await asyncio.sleep(0.2)
        self.launcher.release(handle)

    def find_replica(self, replica_id: str) -> tuple[ModelGroup, ManagedReplica]:
        for group in self.models.values():
            if replica_id in group.replicas:
                return group, group.replicas[replica_id]
        raise SupervisorError(404, f"unknown worker {replica_id!r}; see `pagedserve workers list`")

    async def drain(self, replica_id: str) -> None:
        """No new requests for this replica; it keeps serving what it has (stop it to end it)."""
        _, replica = self.find_replica(replica_id)
        reply = await self.client.post(f"{self.controller_url}/workers/{replica_id}/drain")
        if reply.status_code == 404:
            raise SupervisorError(
                409, f"{replica_id} is not registered yet (state {replica.state})"
            )
        reply.raise_for_status()

    async def stop(self, replica_id: str) -> None:
        """Drain and stop one replica; its model then runs one replica fewer."""
        group, replica = self.find_replica(replica_id)
        async with group.lock:
            group.target = max(0, len(group.live()) - (replica in group.live()))
            await self._retire(group, replica)

    # --- watching -------------------------------------------------------------------------
    async def tick_replicas(self, replicas: list[ManagedReplica]) -> None:
        """Notice exits and readiness; restart what is due."""
        now = time.monotonic()
        for replica in replicas:
            if replica.state in ("draining", "stopping"):
                continue
            group = self.models.get(replica.model)
            if replica.state in ("backoff", "crash-loop"):
                if now >= replica.restart_at and group is not None:
                    replica.restarts += 1
                    self._launch(group, replica)
                continue
            handle = replica.handle
            if handle is None:
                continue
            code = await asyncio.to_thread(handle.poll)
            if replica.state in ("draining", "stopping") or replica.handle is not handle:
                continue  # retired while polled
            if code is not None:
                logger.error("%s exited with status %s", replica.replica_id, code)
                self.launcher.release(handle)
                replica.handle = None
                self._crashed(replica, code)
                await self._unregister(handle.address)
            elif replica.state == "starting":
                if await self._serving(replica.replica_id, handle.address):
                    replica.state = "ready"
                    logger.info("%s is ready", replica.replica_id)
                elif now - replica.started_at > READY_TIMEOUT:
                    logger.error(
                        "%s not ready after %.0fs: restarting it", replica.replica_id, READY_TIMEOUT
                    )
                    handle.kill()

    def _crashed(self, replica: ManagedReplica, code: int | None) -> None:
        now = time.monotonic()
        replica.last_exit = code
        replica.crashes.append(now)
        while replica.crashes and now - replica.crashes[0] > CRASH_WINDOW:
            replica.crashes.popleft()
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(replica.crashes) - 1))
        replica.restart_at = now + delay
        if len(replica.crashes) >= CRASH_LOOP_COUNT:
            replica.state = "crash-loop"
            logger.error(
                "%s is in a crash loop (%d crashes in %.0f min); retrying every %.0fs",
                replica.replica_id, len(replica.crashes), CRASH_WINDOW / 60, delay,
            )  # fmt: skip
        else:
            replica.state = "backoff"
            logger.warning("restarting %s in %.0fs", replica.replica_id, delay)

    async def _unregister(self, address: str) -> None:
        """A dead worker leaves the registry now, not when its heartbeats are missed: requests
        stop going to it at once."""
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(
                f"{self.controller_url}/unregister_worker", json={"worker_name": address}
            )

    async def _serving(self, replica_id: str, address: str) -> bool:
        """Ready, and registered at the controller: requests can reach it."""
        with contextlib.suppress(httpx.HTTPError):
            if (await self.client.get(f"{address}/ready", timeout=2.0)).status_code != 200:
                return False
            return any(
                w["worker_id"] == replica_id
                and w["worker_name"] == address
                and w["status"] == "ready"
                for w in await self.controller_workers()
            )
        return False

    def _tick_services(self) -> None:
        """A crashed controller, gateway or arena is started again, with the workers' backoff."""
        now = time.monotonic()
        for service in self.stack.services:
            if service.alive():
                continue
            crashes = self._service_crashes.setdefault(service.name, deque())
            if service.name not in self._service_restart_at:
                crashes.append(now)
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(crashes) - 1))
                self._service_restart_at[service.name] = now + delay
                logger.error("the %s exited; restarting it in %.0fs", service.name, delay)
            elif now >= self._service_restart_at[service.name]:
                del self._service_restart_at[service.name]
                service.start()

    async def run_forever(self) -> None:
        while not self.stopping.is_set():
            self._tick_services()
            for group in list(self.models.values()):
                await self.tick_replicas(list(group.replicas.values()))
            await self.autoscale()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), TICK)

    async def autoscale(self) -> None:
        """Each autoscaled model's replica count follows its autoscaler's decision."""
        if not self.autoscalers:
            return
        workers = await self.controller_workers()
        for name, scaler in self.autoscalers.items():
            group = self.models.get(name)
            if group is None or group.lock.locked():
                continue  # a scale in progress: decide on what it leaves
            want = scaler.decide(time.monotonic(), group, workers)
            if want is not None and want != group.target:
                logger.info("autoscaling %s: %d -> %d replicas", name, group.target, want)
                asyncio.create_task(self.scale(name, want, wait=False))

    async def wake(self, model: str) -> int:
        """A request came for a model scaled to zero: start its first replica (not waited for)."""
        group = self.group(model)
        if group.target == 0:
            await self.scale(group.spec.name, max(1, group.spec.min_replicas), wait=False)
            scaler = self.autoscalers.get(group.spec.name)
            if scaler is not None:
                scaler.woken(time.monotonic())
        return group.target

    # --- what the admin API shows ---------------------------------------------------------
    async def controller_workers(self) -> list[dict[str, Any]]:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            reply = await self.client.get(f"{self.controller_url}/workers")
            if reply.status_code == 200:
                return reply.json()["workers"]
        return []

    async def workers(self) -> list[dict[str, Any]]:
        """Every replica with its live load, and any worker registered by hand (unmanaged)."""
        registered = {w["worker_id"]: w for w in await self.controller_workers()}
        rows = []
        for group in self.models.values():
            for r in group.replicas.values():
                w = registered.pop(r.replica_id, None) or {}
                state = r.state
                if state == "ready" and w.get("status") in ("draining", "unready"):
                    state = w["status"]
                rows.append({
                    "worker_id": r.replica_id, "model": r.model,
                    "address": r.handle.address if r.handle else None,
                    "node": r.handle.node if r.handle else None, "state": state,
                    "queue": w.get("queue_length"), "running": w.get("running"),
                    "kv_usage": w.get("kv_usage"),
                    "last_heartbeat": w.get("seconds_since_heart_beat"),
                    "restarts": r.restarts, "managed": True,
                })  # fmt: skip
        for w in registered.values():
            rows.append({
                "worker_id": w["worker_id"], "model": ",".join(w["model_names"]),
                "address": w["worker_name"], "node": None, "state": w["status"],
                "queue": w["queue_length"], "running": w["running"], "kv_usage": w["kv_usage"],
                "last_heartbeat": w["seconds_since_heart_beat"], "restarts": None, "managed": False,
            })  # fmt: skip
        return rows

    async def status(self) -> dict[str, Any]:
        services = []
        for service in self.stack.services:
            healthy = service.alive() and await self._answers(service.ready_url)
            services.append({"name": service.name, "url": service.ready_url.rsplit("/", 1)[0],
                             "healthy": healthy})  # fmt: skip
        models = []
        for group in self.models.values():
            states = [r.state for r in group.replicas.values()]
            models.append({
                "name": group.spec.name, "aliases": group.spec.aliases,
                "replicas": group.target, "ready": states.count("ready"),
                "starting": states.count("starting"),
                "failing": states.count("backoff") + states.count("crash-loop"),
                "tensor_parallel_size": group.spec.tensor_parallel_size,
                "autoscale": group.spec.autoscale.model_dump() if group.spec.autoscale else None,
            })  # fmt: skip
        return {
            "launcher": self.launcher.kind,
            "admin_url": self.admin_url,
            "control_token": bool(self.config.control_token),
            "services": services,
            "models": models,
        }

    async def _answers(self, url: str) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return (await self.client.get(url, timeout=2.0)).status_code == 200
        return False

    # --- stop -----------------------------------------------------------------------------
    async def shutdown(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to every process at once (workers drain), SIGKILL to what is left."""
        self.stopping.set()
        handles = [r.handle for g in self.models.values() for r in g.replicas.values() if r.handle]
        for handle in handles:
            handle.terminate()
        for service in self.stack.services:
            service.terminate()
        deadline = time.monotonic() + timeout
        for handle in handles:
            while await asyncio.to_thread(handle.poll) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        await asyncio.to_thread(self.stack.stop, max(0.0, deadline - time.monotonic()))
        for handle in handles:
            if handle.poll() is None:
                handle.kill()
                handle.wait(5.0)
            self.launcher.release(handle)
        self.launcher.close()
        await self.client.aclose()
        logger.info("stopped every service")

    def kill_all(self) -> None:
        """At once, without draining (a second Ctrl-C)."""
        for group in self.models.values():
            for r in group.replicas.values():
                if r.handle is not None:
                    r.handle.kill()
        for service in self.stack.services:
            service.kill()


def local_url(host: str, port: int) -> str:
    """How this machine reaches a server bound to `host` (all interfaces: over loopback)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def engine_args(engine: dict[str, Any]) -> list[str]:
    """EngineConfig settings as `pagedserve worker` flags (engine_options' names)."""
    args: list[str] = []
    for name, value in engine.items():
        if value is None:
            continue  # the field's own default
        if isinstance(value, bool):
            args.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            args += [flag(name), str(value)]
    return args


async def serve_stack(config: StackConfig, launcher: Launcher) -> None:
    """Run the supervisor and its admin API until SIGINT or SIGTERM."""
    from pagedserve.deploy.admin_api import create_admin_app

    supervisor = Supervisor(config, launcher)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            logger.info("stopping: every service drains (a second Ctrl-C kills them at once)")
            supervisor.stopping.set()
        else:
            supervisor.kill_all()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    admin = _AdminServer(
        uvicorn.Config(
            create_admin_app(supervisor),
            host=config.admin.host,
            port=config.admin.port,
            log_level="warning",
            access_log=False,
        )
    )
    admin_task = asyncio.create_task(admin.serve())
    try:
        starting = asyncio.create_task(supervisor.start())
        stop_wait = asyncio.create_task(supervisor.stopping.wait())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start raises here
            logger.info(
                "serving: gateway %s/v1, controller %s, admin %s",
                supervisor.stack.gateway_url, supervisor.controller_url, supervisor.admin_url,
            )  # fmt: skip
            print(f"pagedserve is serving: gateway {supervisor.stack.gateway_url}/v1, "
                  f"admin {supervisor.admin_url} (`pagedserve workers list`)", flush=True)  # fmt: skip
            await supervisor.run_forever()
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
        stop_wait.cancel()
    finally:
        admin.should_exit = True
        await supervisor.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin_task, 5)


class _AdminServer(uvicorn.Server):
    """uvicorn.Server without its signal handling: the supervisor owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


def check_ports(config: StackConfig) -> None:
    """Every port the stack binds is free, and no two parts share one: else one clear error
    before anything starts."""
    wanted = [("controller", config.controller.host, config.controller.port),
              ("gateway", config.gateway.host, config.gateway.port),
              ("admin", config.admin.host, config.admin.port)]  # fmt: skip
    if config.arena.enabled:
        wanted.append(("arena", config.arena.host, config.arena.port))
    seen: dict[int, str] = {}
    for name, host, port in wanted:
        if port in seen:
            raise SupervisorError(400, f"the {name} and the {seen[port]} both want port {port}")
        seen[port] = name
        if not bindable(host, port):
            raise SupervisorError(
                400, f"port {port} on {host} for the {name} is in use; stop what runs there "
                f"or set {name}.port in the stack file",
            )  # fmt: skip


def run_stack(config: StackConfig) -> None:
    """`pagedserve serve --config`: check, connect where workers run, serve until stopped."""
    check_ports(config)
    launcher: Launcher
    if config.ray is not None:
        from pagedserve.deploy.ray_replicas import RayLauncher

        launcher = RayLauncher(config.ray.address, config.ray, config.log_dir)
    else:
        launcher = LocalLauncher(config.controller.host, config.worker_base_port, config.log_dir)
    asyncio.run(serve_stack(config, launcher))
