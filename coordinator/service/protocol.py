"""What the protocol adapters share. servicers.py (alexnet.v1) and kserve.py (the Open Inference
Protocol) are siblings: each turns its own messages into calls of the domain, through this module,
and neither imports the other.

Here: the one mapping of errors to gRPC statuses (`answer`), the client's deadline, and the
classifier's input: the one size a request's tensors must have (`served_size`, `tensor_shape_fits`)
and each image as a batcher item. The one max-batch check is the classifier's
(`Classifier.check_room`): each adapter asks it before decoding any image.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Callable, Optional

import grpc
import torch

from coordinator.data import BadImage, centre_crop, load_image
from coordinator.service.errors import (
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from coordinator.training.recipe import shown

if TYPE_CHECKING:
    from coordinator.service.serving import Classifier

log = logging.getLogger(__name__)

STATUS_CODES = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
MAX_MESSAGE = 1000  # characters of a status message: it travels in metadata, and may quote the request
MAX_PIXEL_VALUE = 1e4  # preprocessed pixels lie within about +-255


# --- errors and deadlines ------------------------------------------------------------------------
def status_of(exc: Exception, what: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an error met while doing `what`."""
    if isinstance(exc, ServiceError):
        return STATUS_CODES[type(exc)], shown(str(exc), MAX_MESSAGE)
    log.exception("%s failed", what)
    return grpc.StatusCode.INTERNAL, shown(f"{what} failed: {type(exc).__name__}: {exc}", MAX_MESSAGE)


def answer(context, what: str, work: Callable, on_code: Optional[Callable[[grpc.StatusCode], None]] = None):
    """Do one RPC's work and return its result, or abort the call with the status of what went wrong."""
    code = grpc.StatusCode.OK
    try:
        return work()
    except Exception as exc:
        code, message = status_of(exc, what)
        context.abort(code, message)
    finally:
        if on_code is not None:
            on_code(code)


def deadline_of(context) -> Optional[float]:
    """Seconds left before the client's deadline; None when it set none (gRPC then gives a huge number)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 10**6 else None


# --- the classifier's input ----------------------------------------------------------------------
def served_size(classifier: Classifier) -> int:
    """The side of the square image the served network takes: the one size a request's tensors are
    checked against (Unavailable while the towers start). It is the network's own image_size, not
    the data pipeline's crop: a tensor goes to the network as it is, while an encoded image is
    centre-cropped by the pipeline, to the size the networks served here take."""
    engine, _ = classifier.serving()
    return engine.config.image_size


def tensor_shape_fits(shape: list[int], size: int, batched: bool) -> bool:
    """A request's tensor is one image [3, size, size], or with `batched` one or more [N, 3, size, size]."""
    image = shape[1:] if batched else shape
    return image == [3, size, size] and (not batched or shape[0] >= 1)


def decoded_item(i: int, encoded: bytes) -> tuple:
    """An encoded image -> the batcher's item (its centre crop); the error names image i."""
    try:
        return "crop", centre_crop(load_image(io.BytesIO(encoded)))
    except BadImage as exc:
        raise InvalidRequest(f"image {i} cannot be decoded ({exc}); send JPEG, PNG, BMP or WebP bytes") from None


def tensor_item(i: int, values: torch.Tensor) -> tuple:
    """A preprocessed [3, S, S] float32 image -> the batcher's item, once its values are safe to compute on."""
    if not torch.isfinite(values).all():
        raise InvalidRequest(f"image {i}: tensor holds NaN or infinite values")
    if values.abs().max() > MAX_PIXEL_VALUE:  # finite, but far enough out to overflow the network to NaN
        raise InvalidRequest(
            f"image {i}: tensor values reach {values.abs().max().item():.3g}; send preprocessed "
            f"pixels (0..255 minus the mean, or normalised), within +-{MAX_PIXEL_VALUE:g}"
        )
    return "tensor", values


# --- every call --------------------------------------------------------------------------------
class ParseRequests(grpc.ServerInterceptor):
    """Decodes each request inside the call, so that bytes that are not the method's message (or
    hold invalid UTF-8 in a string) get INVALID_ARGUMENT, not the INTERNAL that grpcio answers when
    its own decoding fails before any handler runs."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or not (handler.unary_unary or handler.unary_stream):
            return handler  # unknown methods (UNIMPLEMENTED), and reflection's stream, pass through
        decode, method = handler.request_deserializer, handler_call_details.method.rsplit("/", 1)[-1]

        def parsed(raw, context):
            try:
                return decode(raw)
            except Exception as exc:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid {method} message ({type(exc).__name__}): send the "
                    "message the API's proto defines",
                )

        if handler.unary_unary:
            run = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                lambda raw, context: run(parsed(raw, context), context), response_serializer=handler.response_serializer
            )

        def stream(raw, context):
            yield from handler.unary_stream(parsed(raw, context), context)

        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)
