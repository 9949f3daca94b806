"""Commands that work on files here, without a server (they need torch)."""

from __future__ import annotations

from pathlib import Path


def export_checkpoint(checkpoint, kind: str, output) -> tuple[int, str]:
    """A checkpoint file (or a folder's latest) exported as the server would: (bytes written, what)."""
    from coordinator.service.exports import file_bytes
    from coordinator.service.models import from_payload
    from coordinator.training import load_checkpoint

    model = from_payload(load_checkpoint(checkpoint), f"checkpoint {Path(checkpoint).name}")
    data = file_bytes(model, kind)
    Path(output).write_bytes(data)
    return len(data), model.source
