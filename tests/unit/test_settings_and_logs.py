"""Settings come from BACKPROPAGATE_* variables and a `.env` file; every log line carries the run
it belongs to and no credentials.

Each settings test starts from an environment with no BACKPROPAGATE_* variable and an empty
working directory, so what it sets is all there is.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest
from opentelemetry.sdk.trace import TracerProvider

from backpropagate_api.errors import ConfigError
from backpropagate_api.settings import Settings, get_settings
from backpropagate_services.common.logs import (
    LOG_FORMAT,
    RedactingJsonFormatter,
    RunIdFilter,
    configure_logging,
    current_run_id,
    run_context,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in os.environ:
        if name.startswith("BACKPROPAGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# --- settings ----------------------------------------------------------------------------------


def test_defaults_without_any_configuration() -> None:
    settings = Settings()

    assert settings.home == Path.home() / ".backpropagate"
    assert settings.endpoint is None
    assert settings.queue.backend == "embedded"
    assert settings.store.backend == "local"
    assert settings.safety.source == "auto"


def test_prefixed_variable_sets_a_top_level_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKPROPAGATE_HOME", "/srv/bp")
    monkeypatch.setenv("BACKPROPAGATE_LOG_LEVEL", "DEBUG")

    settings = Settings()

    assert settings.home == Path("/srv/bp")
    assert settings.log_level == "DEBUG"


def test_double_underscore_sets_a_nested_field_and_keeps_its_siblings_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKPROPAGATE_QUEUE__BACKEND", "redis")
    monkeypatch.setenv("BACKPROPAGATE_QUEUE__REDIS_URL", "redis://queue:6379/2")
    monkeypatch.setenv("BACKPROPAGATE_EXPORT__HIGH_BIT_MIN_TOP1", "0.95")
    monkeypatch.setenv("BACKPROPAGATE_STORE__S3_SECURE", "true")

    settings = Settings()

    assert settings.queue.backend == "redis"
    assert settings.queue.redis_url == "redis://queue:6379/2"
    assert settings.queue.namespace == "bp"
    assert settings.export.high_bit_min_top1 == 0.95
    assert settings.store.s3_secure is True


def test_secret_from_the_environment_is_readable_but_not_printed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKPROPAGATE_STORE__S3_SECRET_KEY", "very-secret-value")

    settings = Settings()

    assert settings.store.s3_secret_key.get_secret_value() == "very-secret-value"
    assert "very-secret-value" not in repr(settings)
    assert "very-secret-value" not in str(settings.store)


def test_a_value_outside_the_allowed_choices_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKPROPAGATE_SAFETY__SOURCE", "thermometer")

    with pytest.raises(pydantic.ValidationError, match=r"safety\.source"):
        Settings()


@pytest.mark.parametrize(("value", "steps"), [("5", [5]), ("[3, 5, 8]", [3, 5, 8])])
def test_a_drill_holds_a_run_before_one_step_or_before_each_of_a_list(
    monkeypatch: pytest.MonkeyPatch, value: str, steps: list[int]
) -> None:
    monkeypatch.setenv("BACKPROPAGATE_FAULT__HOLD_AT_STEP", value)

    assert Settings().fault.hold_at_step == steps


def test_get_settings_reports_a_bad_value_as_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKPROPAGATE_SAFETY__SOURCE", "bogus")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError) as caught:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert caught.value.code == "INPUT_CONFIG_INVALID"
    assert "BACKPROPAGATE_SAFETY__SOURCE" in caught.value.message


def test_a_list_setting_that_is_not_json_is_a_config_error_that_says_lists_take_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKPROPAGATE_MODEL__ALLOWED_DIRS", "/srv/models")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError) as caught:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert caught.value.code == "INPUT_CONFIG_INVALID"
    assert '"model"' in caught.value.message
    assert "takes JSON" in caught.value.hint


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME_DIR", "/nope")
    monkeypatch.setenv("ENDPOINT", "elsewhere:1")

    assert Settings().endpoint is None


def test_dot_env_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "BACKPROPAGATE_ENDPOINT=stack.internal:50051\n"
        "BACKPROPAGATE_SAFETY__SOURCE=host\n"
        "UNRELATED=1\n"
    )

    settings = Settings()

    assert settings.endpoint == "stack.internal:50051"
    assert settings.safety.source == "host"


def test_environment_variable_wins_over_dot_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("BACKPROPAGATE_LOG_LEVEL=DEBUG\n")
    monkeypatch.setenv("BACKPROPAGATE_LOG_LEVEL", "ERROR")

    assert Settings().log_level == "ERROR"


def test_dot_env_elsewhere_than_the_working_directory_is_not_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("BACKPROPAGATE_LOG_LEVEL=DEBUG\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")

    assert Settings().log_level == "INFO"


def test_every_service_falls_back_to_the_shared_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKPROPAGATE_ENDPOINT", "stack:50051")
    monkeypatch.setenv("BACKPROPAGATE_ENDPOINTS__SAFETY", "gpu-box:50053")

    settings = Settings()

    assert settings.endpoint_of("dataprep") == "stack:50051"
    assert settings.endpoint_of("trainer") == "stack:50051"
    assert settings.endpoint_of("export") == "stack:50051"
    assert settings.endpoint_of("safety") == "gpu-box:50053"


def test_without_any_endpoint_a_service_has_none() -> None:
    assert Settings().endpoint_of("trainer") is None


def test_model_cache_and_store_default_to_directories_under_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)

    assert settings.model_cache_dir == tmp_path / "models"
    assert settings.local_store_root == tmp_path / "artifacts"


def test_model_cache_and_store_can_be_placed_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKPROPAGATE_HOME", "/home-dir")
    monkeypatch.setenv("BACKPROPAGATE_MODEL_CACHE", "/big-disk/models")
    monkeypatch.setenv("BACKPROPAGATE_STORE__LOCAL_ROOT", "/big-disk/artifacts")

    settings = Settings()

    assert settings.model_cache_dir == Path("/big-disk/models")
    assert settings.local_store_root == Path("/big-disk/artifacts")


# --- logs --------------------------------------------------------------------------------------


LOGGER_NAME = "backpropagate.tests.logs"


class Lines(logging.Handler):
    """Keeps each formatted line, through the same filter and format the services use."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.addFilter(RunIdFilter())
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def after_logger_name(line: str) -> str:
    """The part of a formatted line after the timestamp, level and logger name."""
    return line.split(f" {LOGGER_NAME} ", 1)[1]


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, Lines]]:
    logger = logging.getLogger(LOGGER_NAME)
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


def test_lines_inside_a_run_context_carry_its_run_id_and_others_a_dash(
    log: tuple[logging.Logger, Lines],
) -> None:
    logger, handler = log

    logger.info("before")
    with run_context("run-20260101-abc"):
        logger.info("during")
    logger.info("after")

    assert [after_logger_name(line) for line in handler.lines] == [
        "run_id=- before",
        "run_id=run-20260101-abc during",
        "run_id=- after",
    ]


def test_nested_run_contexts_restore_the_outer_run_id() -> None:
    with run_context("outer"):
        with run_context("inner"):
            assert current_run_id() == "inner"
        assert current_run_id() == "outer"
    assert current_run_id() == "-"


def test_run_context_is_restored_when_the_body_raises() -> None:
    with pytest.raises(KeyError), run_context("failing-run"):
        raise KeyError("boom")

    assert current_run_id() == "-"


def test_run_id_belongs_to_its_thread_only() -> None:
    seen: list[str] = []
    with run_context("main-thread-run"):
        other = threading.Thread(target=lambda: seen.append(current_run_id()))
        other.start()
        other.join()

    assert seen == ["-"]


def test_secrets_in_the_message_are_redacted(log: tuple[logging.Logger, Lines]) -> None:
    logger, handler = log

    logger.warning("s3 login secret_key=abc123 failed, token hf_abcdefghijklmnopqrstuvwxyz")

    assert handler.lines[0].endswith("s3 login secret_key=*** failed, token ***")


def test_secrets_passed_as_arguments_are_redacted_and_the_line_is_kept(
    log: tuple[logging.Logger, Lines],
) -> None:
    logger, handler = log

    logger.warning("connecting with password=%s to %s", "hunter2", "s3")
    logger.info("run %s", "uploaded with access_key=AKIA1234")

    assert [after_logger_name(line) for line in handler.lines] == [
        "run_id=- connecting with password=*** to s3",
        "run_id=- run uploaded with access_key=***",
    ]


def test_configure_logging_installs_one_handler_however_often_it_is_called() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        configure_logging("WARNING")
        configure_logging("DEBUG")

        ours = [h for h in root.handlers if any(isinstance(f, RunIdFilter) for f in h.filters)]
        assert len(ours) == 1
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_json_lines_carry_the_run_and_the_span_they_were_logged_in_and_stay_redacted() -> None:
    tracer = TracerProvider().get_tracer("test")  # a recording tracer, not the process's
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RunIdFilter())
    handler.setFormatter(RedactingJsonFormatter())
    logger = logging.getLogger(f"{LOGGER_NAME}.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tracer.start_as_current_span("train job") as span, run_context("run-1"):
            logger.warning("uploaded with password=%s", "hunter2")
        logger.warning("between runs")
    finally:
        logger.removeHandler(handler)

    during, after = (json.loads(line) for line in stream.getvalue().splitlines())
    context = span.get_span_context()
    assert during == {
        "time": during["time"],
        "level": "WARNING",
        "logger": f"{LOGGER_NAME}.json",
        "run_id": "run-1",
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "message": "uploaded with password=***",
    }
    assert (after["run_id"], after["trace_id"], after["span_id"]) == ("-", "", "")
    assert span.attributes["backpropagate.run_id"] == "run-1"  # the span says whose it is
