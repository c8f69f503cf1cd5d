"""The Open Inference Protocol v2 over gRPC: KServe's ``inference.GRPCInferenceService``
(grpc_predict_v2.proto), served beside HTTP by the same process, model and engine.

The messages are built here from a descriptor table, not from protoc output: no build step, no
generated code tied to one protobuf release, and a private descriptor pool, so the server loads
beside a client library (tritonclient) that registers its own ``inference.*`` messages in the
default pool. The table follows grpc_predict_v2.proto field for field (names and numbers are the
wire contract), plus Triton's ModelConfig RPC with the part of model_config.proto's ``ModelConfig``
that the HTTP ``/config`` route fills (built from that route's JSON); ``tests/serving/test_serve_clients.py``
checks it against tritonclient's own messages. Triton's classification extension (an output's
``classification`` parameter) is served as over HTTP.

Needs the ``grpc`` extra (``pip install 'edgekd[grpc]'``); the server starts it when ``grpc_port``
is set. Errors are gRPC status codes with the HTTP routes' messages (INVALID_ARGUMENT for a bad
request, NOT_FOUND for an unknown model, UNAUTHENTICATED without the API key...). Every call is counted
in /metrics beside the HTTP requests: route ``/inference.GRPCInferenceService/<RPC>``, method ``GRPC``,
status the gRPC status code's name. A ModelInfer call in progress counts in the in-flight gauge
(``edgekd_http_inference_requests_in_flight``) as an HTTP POST does, so the dynamic batcher sees gRPC
arrivals too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import edgekd
from edgekd.errors import StageError
from edgekd.serving import v2_core
from edgekd.serving.errors import RequestError, ServingError
from edgekd.serving.http import api_key_error

if TYPE_CHECKING:
    from edgekd.serving.context import Serving

log = logging.getLogger("edgekd.serving")

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"

# message -> [(field, number, type, repeated)]; type is a scalar name, a message name ("map:X" for
# map<string, X>) or "enum:E" (an enum of ENUMS). Nested messages are "Outer.Inner".
_PARAMS = ("parameters", 4, "map:InferParameter", False)
MESSAGES: dict[str, list[tuple[str, int, str, bool]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool", False)],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool", False)],
    "ModelReadyRequest": [("name", 1, "string", False), ("version", 2, "string", False)],
    "ModelReadyResponse": [("ready", 1, "bool", False)],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string", False), ("version", 2, "string", False),
                               ("extensions", 3, "string", True)],
    "ModelMetadataRequest": [("name", 1, "string", False), ("version", 2, "string", False)],
    "ModelMetadataResponse": [("name", 1, "string", False), ("versions", 2, "string", True),
                              ("platform", 3, "string", False),
                              ("inputs", 4, "ModelMetadataResponse.TensorMetadata", True),
                              ("outputs", 5, "ModelMetadataResponse.TensorMetadata", True)],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, "string", False), ("datatype", 2, "string", False),
                                             ("shape", 3, "int64", True)],
    "ModelInferRequest": [("model_name", 1, "string", False), ("model_version", 2, "string", False),
                          ("id", 3, "string", False), _PARAMS,
                          ("inputs", 5, "ModelInferRequest.InferInputTensor", True),
                          ("outputs", 6, "ModelInferRequest.InferRequestedOutputTensor", True),
                          ("raw_input_contents", 7, "bytes", True)],
    "ModelInferRequest.InferInputTensor": [("name", 1, "string", False), ("datatype", 2, "string", False),
                                           ("shape", 3, "int64", True), _PARAMS,
                                           ("contents", 5, "InferTensorContents", False)],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, "string", False),
                                                     ("parameters", 2, "map:InferParameter", False)],
    "ModelInferResponse": [("model_name", 1, "string", False), ("model_version", 2, "string", False),
                           ("id", 3, "string", False), _PARAMS,
                           ("outputs", 5, "ModelInferResponse.InferOutputTensor", True),
                           ("raw_output_contents", 6, "bytes", True)],
    "ModelInferResponse.InferOutputTensor": [("name", 1, "string", False), ("datatype", 2, "string", False),
                                             ("shape", 3, "int64", True), _PARAMS,
                                             ("contents", 5, "InferTensorContents", False)],
    # oneof parameter_choice
    "InferParameter": [("bool_param", 1, "bool", False), ("int64_param", 2, "int64", False),
                       ("string_param", 3, "string", False)],
    "ModelConfigRequest": [("name", 1, "string", False), ("version", 2, "string", False)],
    "ModelConfigResponse": [("config", 1, "ModelConfig", False)],
    # model_config.proto's ModelConfig, the fields v2_core.model_config fills (the rest are left unset).
    "ModelConfig": [("name", 1, "string", False), ("platform", 2, "string", False), ("backend", 17, "string", False),
                    ("max_batch_size", 4, "int32", False), ("input", 5, "ModelInput", True),
                    ("output", 6, "ModelOutput", True), ("parameters", 14, "map:ModelParameter", False)],
    "ModelInput": [("name", 1, "string", False), ("data_type", 2, "enum:DataType", False), ("dims", 4, "int64", True),
                   ("reshape", 5, "ModelTensorReshape", False), ("optional", 8, "bool", False)],
    "ModelOutput": [("name", 1, "string", False), ("data_type", 2, "enum:DataType", False), ("dims", 3, "int64", True),
                    ("reshape", 5, "ModelTensorReshape", False)],
    "ModelTensorReshape": [("shape", 1, "int64", True)],
    "ModelParameter": [("string_value", 1, "string", False)],
    "InferTensorContents": [("bool_contents", 1, "bool", True), ("int_contents", 2, "int32", True),
                            ("int64_contents", 3, "int64", True), ("uint_contents", 4, "uint32", True),
                            ("uint64_contents", 5, "uint64", True), ("fp32_contents", 6, "float", True),
                            ("fp64_contents", 7, "double", True), ("bytes_contents", 8, "bytes", True)],
}
ONEOFS = {"InferParameter": "parameter_choice"}
# enum -> its values, by number (model_config.proto's DataType).
ENUMS = {"DataType": ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                      "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64",
                      "TYPE_STRING", "TYPE_BF16"]}
RPCS = {  # name -> (request, response, needs the API key)
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse", False),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse", False),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse", True),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse", True),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse", True),
    "ModelConfig": ("ModelConfigRequest", "ModelConfigResponse", True),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse", True),
}
# The inference RPCs: in progress, each counts in the in-flight gauge as an HTTP POST does, which the
# engine reads (its ``arrivals``) to know whether more requests are coming for a batch.
IN_FLIGHT_RPCS = frozenset({"ModelInfer"})
# Which InferTensorContents field carries each datatype when a client sends typed contents.
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _file_descriptor() -> Any:
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto(name="edgekd/grpc_predict_v2.proto", package=PACKAGE, syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    for enum, values in ENUMS.items():
        fd.enum_type.add(name=enum).value.extend(
            descriptor_pb2.EnumValueDescriptorProto(name=v, number=i) for i, v in enumerate(values))
    protos: dict[str, Any] = {}
    for full in MESSAGES:  # outer messages come before their nested ones in the table
        outer, _, inner = full.partition(".")
        protos[full] = protos[outer].nested_type.add(name=inner) if inner else fd.message_type.add(name=full)
    for full, fields in MESSAGES.items():
        msg = protos[full]
        oneof = ONEOFS.get(full)
        if oneof:
            msg.oneof_decl.add(name=oneof)
        for name, number, kind, repeated in fields:
            f = msg.field.add(name=name, number=number)
            f.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
            if oneof:
                f.oneof_index = 0
            if kind.startswith("map:"):  # map<string, V>: a repeated nested XxxEntry message
                entry = msg.nested_type.add(name="".join(p.title() for p in name.split("_")) + "Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
                entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                                type_name=f".{PACKAGE}.{kind[4:]}")
                f.label, f.type, f.type_name = F.LABEL_REPEATED, F.TYPE_MESSAGE, f".{PACKAGE}.{full}.{entry.name}"
            elif kind in MESSAGES:
                f.type, f.type_name = F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
            elif kind.startswith("enum:"):
                f.type, f.type_name = F.TYPE_ENUM, f".{PACKAGE}.{kind[5:]}"
            else:
                f.type = getattr(F, "TYPE_" + kind.upper())
    return fd


def message_classes() -> dict[str, type]:
    """The protocol's message classes, from a private descriptor pool."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in MESSAGES}


# --- the service ----------------------------------------------------------------------------------------------
_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
          415: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def _request_tensors(request: Any) -> list[v2_core.Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send one "
                           "per input, in the inputs' order.")
    tensors = []
    for i, inp in enumerate(request.inputs):
        shape = v2_core.check_shape(inp.name, list(inp.shape))
        if raw:
            if inp.HasField("contents"):
                raise RequestError(f"input '{inp.name}' has contents although raw_input_contents is used: send one.")
            tensors.append(v2_core.from_raw(inp.name, inp.datatype, shape, raw[i]))
            continue
        field = CONTENTS.get(inp.datatype)
        if field is None:
            raise RequestError(f"input '{inp.name}' of datatype {inp.datatype} needs raw_input_contents.")
        tensors.append(v2_core.from_values(inp.name, inp.datatype, shape, list(getattr(inp.contents, field))))
    return tensors


def _parameters(params: Any) -> dict[str, Any]:
    """A map<string, InferParameter> as plain values (bool, int or str: whichever the oneof holds)."""
    return {k: getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None
            for k, p in params.items()}


class InferenceService:
    """The RPCs over one serving context (the HTTP app's)."""

    def __init__(self, get_serving: Callable[[], Serving | None], messages: dict[str, type]):
        self.get_serving = get_serving
        self.m = messages

    def _serving(self) -> Serving:
        serving = self.get_serving()
        if serving is None:
            raise ServingError("the model is not loaded (yet): retry in a moment.", 503, "not_ready")
        return serving

    async def ServerLive(self, request: Any) -> Any:
        return self.m["ServerLiveResponse"](live=True)

    async def ServerReady(self, request: Any) -> Any:
        return self.m["ServerReadyResponse"](ready=self.get_serving() is not None)

    async def ModelReady(self, request: Any) -> Any:
        serving = self.get_serving()
        if serving is None:  # loading or shutting down: "not ready", as HTTP's {"ready": false}, not an error
            return self.m["ModelReadyResponse"](ready=False)
        v2_core.check_model(serving, request.name, request.version)
        return self.m["ModelReadyResponse"](ready=True)

    async def ServerMetadata(self, request: Any) -> Any:
        return self.m["ServerMetadataResponse"](name="edgekd", version=edgekd.__version__,
                                                extensions=v2_core.EXTENSIONS)

    async def ModelMetadata(self, request: Any) -> Any:
        serving = self._serving()
        v2_core.check_model(serving, request.name, request.version)
        spec = v2_core.model_spec(serving.model)
        tensor = self.m["ModelMetadataResponse.TensorMetadata"]
        return self.m["ModelMetadataResponse"](
            name=serving.model.name, versions=[v2_core.MODEL_VERSION], platform=serving.model.platform,
            inputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in spec.inputs],
            outputs=[tensor(name=n, datatype=d, shape=s) for n, d, s in spec.outputs],
        )

    async def ModelConfig(self, request: Any) -> Any:
        from google.protobuf import json_format

        serving = self._serving()
        v2_core.check_model(serving, request.name, request.version)
        config = self.m["ModelConfig"]()
        json_format.ParseDict(v2_core.model_config(serving.model, serving.settings), config)
        return self.m["ModelConfigResponse"](config=config)

    async def ModelInfer(self, request: Any) -> Any:
        serving = self._serving()
        v2_core.check_model(serving, request.model_name, request.model_version)
        v2_core.refuse_shared_memory([(i.name, _parameters(i.parameters)) for i in request.inputs],
                                     [(o.name, _parameters(o.parameters)) for o in request.outputs])
        requested = [o.name for o in request.outputs] or None
        classes = {o.name: k for o in request.outputs
                   if (k := v2_core.class_count(o.name, _parameters(o.parameters))) is not None}
        outputs = await v2_core.infer(_request_tensors(request), requested, serving, classes)
        tensor = self.m["ModelInferResponse.InferOutputTensor"]
        return self.m["ModelInferResponse"](
            model_name=serving.model.name, model_version=v2_core.MODEL_VERSION, id=request.id,
            outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in outputs],
            raw_output_contents=[o.raw() for o in outputs],
        )


class Undecodable:
    """What the deserializer hands on for bytes that are not the message, so that the client gets
    INVALID_ARGUMENT (grpc's own answer to a failing deserializer is INTERNAL)."""

    def __init__(self, reason: str):
        self.reason = reason


def _deserializer(cls: type) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as e:  # google.protobuf.message.DecodeError, or a RecursionError on deep nesting
            return Undecodable(f"{type(e).__name__}: {e}")

    return parse


def _handler(service: InferenceService, name: str, needs_key: bool, api_key: Any) -> Callable[..., Awaitable[Any]]:
    import grpc

    method = getattr(service, name)
    route = f"/{SERVICE}/{name}"  # the RPC's path, as the route label of /metrics
    in_flight = name in IN_FLIGHT_RPCS

    async def call(request: Any, context: Any) -> Any:
        serving = service.get_serving()
        start = time.perf_counter()
        code = "UNKNOWN"  # the status name it is counted under, as HTTP requests are by status code
        counted = in_flight and serving is not None  # one not yet ready has no metrics (and no engine) to feed
        if counted:
            serving.metrics.request_started()
        try:
            if isinstance(request, Undecodable):
                raise RequestError(f"the request is not a valid {name} message ({request.reason}).")
            if needs_key:
                md = {k.lower(): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
                error = api_key_error(api_key, md.get("x-api-key"), md.get("authorization", ""))
                if error is not None:
                    raise error
            response = await method(request)
            code = "OK"
            return response
        except ServingError as e:
            if serving is not None:
                serving.metrics.errors.labels(e.kind).inc()
            code = _CODES.get(e.status, "INVALID_ARGUMENT")
            await context.abort(getattr(grpc.StatusCode, code), str(e))
        except asyncio.CancelledError:  # the client went away (or the server stopped) mid-call
            code = "CANCELLED"
            raise
        except Exception as e:  # a bug or a runtime failure: logged in full, the client told little
            if isinstance(e, grpc.aio.AbortError):
                raise
            log.exception("internal error in gRPC %s", name)
            if serving is not None:
                serving.metrics.errors.labels("internal").inc()
            code = "INTERNAL"
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); the server log "
                                "has the details.")
        finally:
            if counted:
                serving.metrics.request_finished()
            if serving is not None:  # one not yet ready has no metrics to feed
                serving.metrics.observe_request(route, "GRPC", code, time.perf_counter() - start)

    return call


async def start_server(get_serving: Callable[[], Serving | None], settings: Any) -> Any:
    """A started ``grpc.aio`` server on ``settings.host:settings.grpc_port`` (stop it with ``.stop(grace)``)."""
    try:
        import grpc
    except ImportError:
        raise StageError("grpc_port is set but grpcio is not installed: pip install 'edgekd[grpc]', or leave "
                         "grpc_port unset.") from None
    service = InferenceService(get_serving, message_classes())
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _handler(service, name, needs_key, settings.api_key),
            request_deserializer=_deserializer(service.m[req]), response_serializer=service.m[resp].SerializeToString)
        for name, (req, resp, needs_key) in RPCS.items()
    }
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_body_bytes),
                                      ("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise StageError(f"the gRPC server could not bind {address}: pick another grpc_port.")
    await server.start()
    log.info("gRPC (Open Inference Protocol v2) on %s", address)
    return server
