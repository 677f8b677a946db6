"""The same main job with no servers at all: the client runs the stack in its own process."""

from __future__ import annotations

from pathlib import Path

import pytest
from main_job import check_main_job, check_malformed_dataset_is_rejected

from backpropagate import Trainer
from backpropagate_services.common.settings import Settings

pytestmark = [pytest.mark.model, pytest.mark.llama]


@pytest.fixture(scope="module")
def embedded_trainer(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    settings = Settings(home=tmp_path_factory.mktemp("embedded-home"), model_cache=model_cache)
    trainer = Trainer(settings=settings, progress=False)
    assert trainer.connection.embedded
    return trainer


def test_main_job_through_the_embedded_default(
    embedded_trainer: Trainer, quickstart: Path, tmp_path: Path
) -> None:
    check_main_job(embedded_trainer, quickstart, tmp_path / "out")


def test_malformed_dataset_error_in_embedded_mode(
    embedded_trainer: Trainer, tmp_path: Path
) -> None:
    check_malformed_dataset_is_rejected(embedded_trainer, tmp_path)
