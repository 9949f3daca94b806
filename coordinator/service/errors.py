"""The service's one error type. Whatever refuses a request raises a ServiceError subclass, whose
message says what to fix; protocol.py turns it into a gRPC status, in one place, for every protocol."""


class ServiceError(Exception):
    """A request the service refuses."""


class InvalidRequest(ServiceError):
    """The request itself is wrong: a bad field, image or spec."""


class NotFound(ServiceError):
    """The request names something that does not exist."""


class PreconditionFailed(ServiceError):
    """The service is not in a state to do it now, e.g. another job holds the towers."""


class Unavailable(ServiceError):
    """Not now, but soon: the service is starting or shutting down. Retry."""


class PermissionDenied(ServiceError):
    """The request names a path outside the roots the server was given."""


class ResourceExhausted(ServiceError):
    """A bounded resource is full (the classify queue, the watch streams). Retry later, with backoff."""


class DeadlineExceeded(ServiceError):
    """The client's deadline passed before the answer was ready; what was left of the work was dropped."""
