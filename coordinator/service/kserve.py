"""The Open Inference Protocol (KServe v2) on the server's port: `inference.GRPCInferenceService`.

One model, `alexnet`, at the version being served. Its input INPUT__0 is FP32 [N, 3, S, S]
(preprocessed pixels, as Classify's tensors) or BYTES [N] (encoded images), in raw_input_contents
or in the typed contents. Its output `probabilities` is FP32 [N, classes]; with Triton's
classification extension (the requested output's parameter `classification` = k) it is BYTES
[N, k] of "score:index:label" instead. ModelInfer goes through Classify's batcher, limits and
metrics (protocol label kserve.v2). Only the version being served answers: another is NOT_FOUND.

A sibling of servicers.py (alexnet.v1): what both need, from the one max-batch and size checks to
the mapping of errors to gRPC statuses, is in protocol.py; this module converts its own messages.
ServerLive and ServerReady answer without a token, like health; the rest needs the read role.
The generated code registers the proto package `inference` in protobuf's default descriptor pool,
as tritonclient's does: the server's process must never import tritonclient.
"""

from __future__ import annotations

import math
import struct
import time
from importlib import metadata

import numpy as np
import torch

from alexnet_api.inference_v2 import open_inference_grpc_pb2 as v2
from alexnet_api.inference_v2 import open_inference_grpc_pb2_grpc as v2_rpc
from coordinator.service.errors import InvalidRequest, NotFound, Unavailable
from coordinator.service.metrics import KSERVE_V2, Metrics
from coordinator.service.protocol import answer, deadline_of, decoded_item, served_size, tensor_item, tensor_shape_fits
from coordinator.service.serving import Classifier
from coordinator.service.versions import ModelVersion, check_top_k, top_classes
from coordinator.training.recipe import shown

SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name
MODEL, INPUT, OUTPUT, PLATFORM = "alexnet", "INPUT__0", "probabilities", "alexnet-mp"
CLASSIFICATION = "classification"  # Triton's extension: the requested output's top-k, as labels
INPUT_FORMS = "FP32 [N, 3, {size}, {size}] of preprocessed pixels, or BYTES [N] of encoded images"
LENGTH = struct.Struct("<I")  # a BYTES element in raw contents: its length (4 bytes, little-endian), then its bytes
SHARED_MEMORY = "shared_memory_region"


def server_version() -> str:
    try:
        return metadata.version("alexnet-mp")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# --- requests ------------------------------------------------------------------------------------
def infer_items(request: v2.ModelInferRequest, classifier: Classifier) -> list:
    """The request's one input, INPUT__0 -> the batcher's items, with errors that say what to fix."""
    size = served_size(classifier)
    forms = INPUT_FORMS.format(size=size)
    if len(request.inputs) != 1:
        raise InvalidRequest(f"{len(request.inputs)} inputs: send one, {INPUT} ({forms})")
    tensor = request.inputs[0]
    if tensor.name != INPUT:
        raise InvalidRequest(f"unknown input {shown(tensor.name, 64)!r}: the model's input is {INPUT} ({forms})")
    if SHARED_MEMORY in tensor.parameters:
        raise InvalidRequest(f"{INPUT} names a shared memory region; this server takes the data in the request only")
    shape, raw = list(tensor.shape), raw_input(request, tensor)
    if tensor.datatype == "FP32":
        if not tensor_shape_fits(shape, size, batched=True):
            raise InvalidRequest(
                f"{INPUT} is FP32 of shape {shown(shape, 64)}; it must be [N, 3, {size}, {size}], N >= 1"
            )
        classifier.check_room(shape[0])  # too many, or a full queue: refused before reading the values
        return pixel_items(tensor, raw, shape)
    if tensor.datatype == "BYTES":
        if len(shape) != 1 or shape[0] < 1:
            raise InvalidRequest(
                f"{INPUT} is BYTES of shape {shown(shape, 64)}; it must be [N], N >= 1: one encoded image per element"
            )
        classifier.check_room(shape[0])  # too many, or a full queue: refused before decoding
        elements = bytes_elements(raw, shape[0]) if raw is not None else list(tensor.contents.bytes_contents)
        if len(elements) != shape[0]:
            raise InvalidRequest(
                f"{INPUT}: contents.bytes_contents holds {len(elements)} elements; shape {shape} needs {shape[0]}"
            )
        return [decoded_item(i, element) for i, element in enumerate(elements)]
    raise InvalidRequest(f"{INPUT} has datatype {shown(tensor.datatype, 16)!r}; send {forms}")


def pixel_items(tensor, raw: bytes | None, shape: list[int]) -> list:
    """FP32 [N, 3, S, S] in raw or typed contents -> one batcher item per image."""
    count = math.prod(shape)
    if raw is not None and len(raw) != 4 * count:
        raise InvalidRequest(f"{INPUT}: raw_input_contents holds {len(raw)} bytes; FP32 {shape} needs {4 * count}")
    if raw is None and len(tensor.contents.fp32_contents) != count:
        raise InvalidRequest(
            f"{INPUT}: contents.fp32_contents holds {len(tensor.contents.fp32_contents)} values; {shape} needs {count}"
        )
    values = (
        np.frombuffer(raw, "<f4").astype(np.float32)
        if raw is not None
        else np.asarray(tensor.contents.fp32_contents, np.float32)
    )
    images = torch.from_numpy(values).reshape(shape)
    return [tensor_item(i, image) for i, image in enumerate(images)]


def raw_input(request: v2.ModelInferRequest, tensor) -> bytes | None:
    """The input's raw contents; None when it comes in the typed contents."""
    if not request.raw_input_contents:
        return None
    if len(request.raw_input_contents) != len(request.inputs):
        raise InvalidRequest(
            f"raw_input_contents holds {len(request.raw_input_contents)} tensors for "
            f"{len(request.inputs)} inputs: send one per input"
        )
    if tensor.HasField("contents"):
        raise InvalidRequest(f"{INPUT} has both raw_input_contents and contents: send one of them")
    return request.raw_input_contents[0]


def bytes_elements(raw: bytes, n: int) -> list[bytes]:
    """BYTES raw contents -> its n elements, each sent as a 4-byte length and then its bytes."""
    elements, at = [], 0
    while at < len(raw) and len(elements) < n:
        if at + LENGTH.size > len(raw):
            break
        (length,) = LENGTH.unpack_from(raw, at)
        at += LENGTH.size
        if at + length > len(raw):
            raise InvalidRequest(
                f"{INPUT}: BYTES element {len(elements)} says {length} bytes, but only "
                f"{len(raw) - at} follow in raw_input_contents"
            )
        elements.append(raw[at : at + length])
        at += length
    if len(elements) != n or at != len(raw):
        raise InvalidRequest(
            f"{INPUT}: raw_input_contents holds {len(elements)} BYTES elements and {len(raw) - at} "
            f"bytes more; shape [{n}] needs {n} elements, each a 4-byte little-endian length "
            "and then that many bytes"
        )
    return elements


def requested_outputs(request: v2.ModelInferRequest, classes: int) -> list[tuple[str, int]]:
    """(name, k) per output to return: k = 0 for the probabilities, k > 0 for the top k as labels."""
    if not request.outputs:
        return [(OUTPUT, 0)]
    wanted = []
    for output in request.outputs:
        if output.name != OUTPUT:
            raise InvalidRequest(f"unknown output {shown(output.name, 64)!r}: the model's output is {OUTPUT}")
        if SHARED_MEMORY in output.parameters:
            raise InvalidRequest(f"{OUTPUT} names a shared memory region; this server answers in the response only")
        k = 0
        if CLASSIFICATION in output.parameters:
            parameter = output.parameters[CLASSIFICATION]
            kind = parameter.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param"):
                raise InvalidRequest(f"the {CLASSIFICATION} parameter must be an int64: how many classes to return")
            k = getattr(parameter, kind)
            try:
                check_top_k(k, classes)
            except InvalidRequest:
                raise InvalidRequest(
                    f"{CLASSIFICATION} must be between 1 and {classes} (the classes), got {k}"
                ) from None
        wanted.append((output.name, k))
    return wanted


# --- responses -----------------------------------------------------------------------------------
def infer_response(request, probs: torch.Tensor, version: ModelVersion, wanted) -> v2.ModelInferResponse:
    """Every output in raw_output_contents, as Triton's clients read them."""
    response = v2.ModelInferResponse(model_name=MODEL, model_version=str(version.version), id=request.id)
    for name, k in wanted:
        if k:
            rows = top_classes(probs, version, k)
            labels = [f"{p.probability:f}:{p.class_index}:{p.label}".encode() for row in rows for p in row]  # Triton's
            response.outputs.add(name=name, datatype="BYTES", shape=[len(rows), len(rows[0])])
            response.raw_output_contents.append(b"".join(LENGTH.pack(len(label)) + label for label in labels))
        else:
            response.outputs.add(name=name, datatype="FP32", shape=list(probs.shape))
            response.raw_output_contents.append(probs.numpy().astype("<f4", copy=False).tobytes())
    return response


def model_metadata(version: ModelVersion, size: int, max_batch: int) -> v2.ModelMetadataResponse:
    """The model as ModelMetadata describes it: its input of `size` (what ModelInfer checks), its output."""
    classes = len(version.labels)
    tensor = v2.ModelMetadataResponse.TensorMetadata
    return v2.ModelMetadataResponse(
        name=MODEL,
        versions=[str(version.version)],
        platform=PLATFORM,
        inputs=[tensor(name=INPUT, datatype="FP32", shape=[-1, 3, size, size])],
        outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, classes])],
        properties={
            "input_forms": INPUT_FORMS.format(size=size),
            "max_batch_size": str(max_batch),
            "classification": f"ask {OUTPUT} with the parameter {CLASSIFICATION}=k (1..{classes}): "
            "BYTES [N, k] of score:index:label",
            "model_note": version.note,
        },
    )


class KServeServicer(v2_rpc.GRPCInferenceServiceServicer):
    def __init__(self, classifier: Classifier, metrics: Metrics):
        self.classifier, self.metrics = classifier, metrics

    def ServerLive(self, request, context):
        return v2.ServerLiveResponse(live=True)  # it answers: it is live

    def ServerReady(self, request, context):
        return v2.ServerReadyResponse(ready=self.classifier.ready())

    def ServerMetadata(self, request, context):
        return v2.ServerMetadataResponse(name=PLATFORM, version=server_version(), extensions=[CLASSIFICATION])

    def ModelReady(self, request, context):
        def ready() -> bool:  # an unknown model or version is not ready (as Triton answers), not an error
            try:
                self._model(request.name, request.version)
            except (NotFound, Unavailable):
                return False
            return self.classifier.ready()

        return answer(context, "checking the model", lambda: v2.ModelReadyResponse(ready=ready()))

    def ModelMetadata(self, request, context):
        def describe():
            version = self._model(request.name, request.version)
            return model_metadata(version, served_size(self.classifier), self.classifier.max_batch)

        return answer(context, "describing the model", describe)

    def ModelInfer(self, request, context):
        start = time.perf_counter()

        def infer():
            version = self._model(request.model_name, request.model_version)
            items = infer_items(request, self.classifier)
            wanted = requested_outputs(request, len(version.labels))
            probs, answered = self.classifier.probabilities(items, deadline_of(context), context.is_active)
            if request.model_version and answered.version != version.version:
                raise NotFound(
                    f"model {MODEL} version {version.version} was replaced by version {answered.version} "
                    "while the request waited; ask for that one, or leave the version empty"
                )
            return infer_response(request, probs, answered, wanted)

        observe = lambda code: self.metrics.observe_classify(KSERVE_V2, code, time.perf_counter() - start)  # noqa: E731
        return answer(context, "inference", infer, on_code=observe)

    def _model(self, name: str, version: str) -> ModelVersion:
        """The version served, if it is what the request names; NotFound otherwise."""
        if name != MODEL:
            raise NotFound(f"no model {shown(name, 64)!r} here: this server serves one model, {MODEL!r}")
        _, current = self.classifier.serving()
        if version and version != str(current.version):
            raise NotFound(
                f"model {MODEL} version {shown(version, 32)!r} is not served: this server serves version "
                f"{current.version} only (an empty version means it)"
            )
        return current
