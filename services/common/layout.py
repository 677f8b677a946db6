"""The shared layout of the artifact store and the queue's names: the contract between services.

The trainer writes runs/<run_id>/..., the export service reads them and writes
exports/<export_id>/...; both go through these functions so the layout is written down once.
"""

from __future__ import annotations

TRAIN_QUEUE = "train"
EXPORT_QUEUE = "export"


def run_record_key(run_id: str) -> str:
    return f"runs/{run_id}/run.json"


def adapter_prefix(run_id: str) -> str:
    return f"runs/{run_id}/adapter"


def checkpoints_prefix(run_id: str) -> str:
    return f"runs/{run_id}/checkpoints"


def checkpoint_prefix(run_id: str, step: int, attempt: int) -> str:
    """Zero-padded, so that listing order is step order. Named by attempt too: a stalled worker
    that lost the run to another must never write into a checkpoint the new holder owns."""
    return f"{checkpoints_prefix(run_id)}/step-{step:08d}-attempt-{attempt:03d}"


def merge_state_key(campaign_id: str) -> str:
    """A campaign's merge state and timeline, rewritten after every run it merges."""
    return f"runs/{campaign_id}/merge.pt"


def loss_curve_key(run_id: str) -> str:
    return f"runs/{run_id}/loss.png"


def run_events_channel(run_id: str) -> str:
    return f"run:{run_id}"


def cancel_channel(run_id: str) -> str:
    return f"cancel:{run_id}"


def export_record_key(export_id: str) -> str:
    return f"exports/{export_id}/export.json"


def export_file_key(export_id: str, name: str) -> str:
    """Where an export's file is kept: under the name it is downloaded as."""
    return f"exports/{export_id}/{name}"


def export_events_channel(export_id: str) -> str:
    return f"export:{export_id}"
