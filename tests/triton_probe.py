"""The unmodified Triton client against a server, in a process of its own; prints what it saw as JSON.

    python tests/triton_probe.py HOST:PORT TENSORS.npy IMAGE...

tritonclient's generated code defines the proto package `inference` in protobuf's default pool, as
the server's does (alexnet_api.inference_v2): the two cannot share a process, so the tests run
the client here (tests/test_kserve.py).
"""

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def infer(client, data: np.ndarray, datatype: str, class_count: int = 0) -> list:
    tensor = triton.InferInput("INPUT__0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    outputs = [triton.InferRequestedOutput("probabilities", class_count=class_count)]
    result = client.infer("alexnet", [tensor], outputs=outputs)
    values = result.as_numpy("probabilities")
    return [[v.decode() for v in row] for row in values] if class_count else values.tolist()


def main() -> None:
    target, tensors, images = sys.argv[1], np.load(sys.argv[2]), [Path(p).read_bytes() for p in sys.argv[3:]]
    encoded = np.array(images, dtype=np.object_)
    client = triton.InferenceServerClient(url=target)
    seen = dict(
        live=client.is_server_live(),
        ready=client.is_server_ready(),
        model_ready=client.is_model_ready("alexnet"),
        other_model_ready=client.is_model_ready("resnet"),
        server=client.get_server_metadata(as_json=True),
        metadata=client.get_model_metadata("alexnet", as_json=True),
        fp32_top=infer(client, tensors, "FP32", class_count=5),
        fp32_probabilities=infer(client, tensors, "FP32"),
        bytes_top=infer(client, encoded, "BYTES", class_count=5),
        bytes_probabilities=infer(client, encoded, "BYTES"),
    )
    try:
        client.get_model_metadata("alexnet", model_version="12345")
    except InferenceServerException as exc:
        seen["old_version"] = [exc.status(), exc.message()]
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
