"""The supervisor's admin HTTP API, which `pagedserve workers ...` and `pagedserve status` use.

It binds loopback by default; bound anywhere else the stack file must set a control token,
and then every route but /admin/health wants `Authorization: Bearer <token>`. Errors take
OpenAI's shape, as the gateway's do.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from pagedserve.api_gateway.errors import GatewayError
from pagedserve.deploy.stack_config import ModelSection
from pagedserve.deploy.supervisor import Supervisor, SupervisorError
from pagedserve.protocol.control_token import check_bearer

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          409: "conflict_error"}  # fmt: skip


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int
    wait: bool = True  # going up: answer once the new replicas are ready


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = _TYPES.get(status, "server_error")
    return GatewayError(status, message, type=kind, param=param).response()


def create_admin_app(supervisor: Supervisor) -> FastAPI:
    app = FastAPI(title="pagedserve supervisor", docs_url=None, redoc_url=None)
    token = supervisor.config.control_token

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if token and request.url.path != "/admin/health":
            given = request.headers.get("authorization", "").encode()
            if not check_bearer(given, token):
                return _error(
                    401, "this supervisor wants its control token (Authorization: Bearer ...)"
                )
        return await call_next(request)

    @app.exception_handler(SupervisorError)
    async def _refused(request: Request, e: SupervisorError) -> JSONResponse:
        return _error(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"][1:]) or None
        return _error(400, f"{loc}: {err['msg']}" if loc else err["msg"], loc)

    @app.get("/admin/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/admin/status")
    async def status() -> dict[str, Any]:
        return await supervisor.status()

    @app.get("/admin/workers")
    async def workers() -> dict[str, Any]:
        return {"workers": await supervisor.workers()}

    @app.post("/admin/models")
    async def launch(request: Request) -> dict[str, Any]:
        """Serve a new model: the body is a stack file's `models:` entry."""
        try:
            spec = ModelSection.model_validate(await request.json())
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or None
            raise SupervisorError(400, f"{loc}: {err['msg']}" if loc else err["msg"]) from None
        except ValueError:
            raise SupervisorError(400, "the body must be a JSON object") from None
        group = await supervisor.add_model(spec)
        return {"model": spec.name, "replicas": group.target}

    @app.post("/admin/models/{model}/scale")
    async def scale(model: str, body: ScaleRequest) -> dict[str, Any]:
        changed = await supervisor.scale(model, body.replicas, wait=body.wait)
        return {"model": supervisor.group(model).spec.name, "replicas": body.replicas,
                "changed": [r.replica_id for r in changed]}  # fmt: skip

    @app.post("/admin/models/{model}/wake")
    async def wake(model: str) -> dict[str, Any]:
        """For the gateway: a request waits for this model, scaled to zero."""
        return {"model": model, "replicas": await supervisor.wake(model)}

    @app.post("/admin/workers/{worker_id}/drain")
    async def drain(worker_id: str) -> dict[str, str]:
        await supervisor.drain(worker_id)
        return {"worker_id": worker_id, "state": "draining"}

    @app.post("/admin/workers/{worker_id}/stop")
    async def stop(worker_id: str) -> dict[str, str]:
        await supervisor.stop(worker_id)
        return {"worker_id": worker_id, "state": "stopped"}

    return app
