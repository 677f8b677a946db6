"""The shared layout of the artifact store and the queue's names: the contract between services.

The trainer writes runs/<run_id>/..., the export service reads them and writes
exports/<export_id>/...; both go through these functions so the layout is written down once.
Every id is checked on its way into a key, so no caller's id can name a key outside its place.
"""

from __future__ import annotations

from backpropagate_api.ids import checked_id

TRAIN_QUEUE = "train"
EXPORT_QUEUE = "export"


def run_record_key(run_id: str) -> str:
    return f"runs/{checked_id(run_id, 'run')}/run.json"


def adapter_prefix(run_id: str) -> str:
    return f"runs/{checked_id(run_id, 'run')}/adapter"


def checkpoints_prefix(run_id: str) -> str:
    return f"runs/{checked_id(run_id, 'run')}/checkpoints"


def checkpoint_prefix(run_id: str, step: int, attempt: int) -> str:
    """Zero-padded, so that listing order is step order. Named by attempt too: a stalled worker
    that lost the run to another must never write into a checkpoint the new holder owns."""
    return f"{checkpoints_prefix(run_id)}/step-{step:08d}-attempt-{attempt:03d}"


def merge_state_key(campaign_id: str) -> str:
    """A campaign's merge state and timeline, rewritten after every run it merges."""
    return f"runs/{checked_id(campaign_id, 'campaign')}/merge.pt"


def loss_curve_key(run_id: str) -> str:
    return f"runs/{checked_id(run_id, 'run')}/loss.png"


def run_events_channel(run_id: str) -> str:
    return f"run:{checked_id(run_id, 'run')}"


def cancel_channel(run_id: str) -> str:
    return f"cancel:{checked_id(run_id, 'run')}"


def export_record_key(export_id: str) -> str:
    return f"exports/{checked_id(export_id, 'export')}/export.json"


def export_file_key(export_id: str, name: str) -> str:
    """Where an export's file is kept: under the name it is downloaded as."""
    return f"exports/{checked_id(export_id, 'export')}/{name}"


def export_events_channel(export_id: str) -> str:
    return f"export:{checked_id(export_id, 'export')}"
