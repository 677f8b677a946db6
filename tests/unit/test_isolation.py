"""Native work in a child process: results and errors come back whole, a crash is contained."""

from __future__ import annotations

import os

import pytest

from backpropagate_api.errors import (
    BackpropagateError,
    ConversionError,
    NativeCrashError,
)
from backpropagate_services.common.isolation import run_isolated


def raise_conversion_error(source: str) -> None:
    raise ConversionError("could not convert", hint="try f16", source=source)


def divide(a: int, b: int) -> float:
    return a / b


def test_the_target_runs_in_another_process_and_its_result_comes_back():
    assert run_isolated("test", os.getpid) != os.getpid()
    assert run_isolated("test", divide, 7, b=2) == 3.5


def test_an_error_raised_in_the_child_arrives_with_its_code_hint_and_context():
    with pytest.raises(ConversionError) as caught:
        run_isolated("test", raise_conversion_error, "model.gguf")

    assert caught.value.code == "RUNTIME_GGUF_CONVERSION_FAILED"
    assert caught.value.hint == "try f16"
    assert caught.value.context == {"source": "model.gguf"}


def test_an_unexpected_exception_in_the_child_is_reported_as_an_internal_error():
    with pytest.raises(BackpropagateError) as caught:
        run_isolated("test", divide, 1, 0)

    assert caught.value.code == "INTERNAL"
    assert "ZeroDivisionError" in caught.value.message


def test_a_segfault_in_the_child_is_a_native_crash_error_naming_the_signal(monkeypatch):
    from backpropagate_api.settings import get_settings

    # The drill setting reaches the child through its environment, as in a service.
    monkeypatch.setenv("BACKPROPAGATE_FAULT__NATIVE_CRASH_STAGE", "quantize")
    get_settings.cache_clear()
    try:
        with pytest.raises(NativeCrashError) as caught:
            run_isolated("quantize", divide, 1, 1)
        # Another stage in the same parent is unaffected.
        assert run_isolated("verify", divide, 4, 2) == 2
    finally:
        get_settings.cache_clear()

    assert caught.value.code == "RUNTIME_NATIVE_CRASH"
    assert caught.value.context == {"stage": "quantize", "signal": "SIGSEGV"}
    assert "SIGSEGV" in caught.value.message


def test_errors_survive_pickling_with_their_class_and_fields():
    import pickle

    error = NativeCrashError("crashed", stage="smoke", signal="SIGABRT")
    again = pickle.loads(pickle.dumps(error))

    assert type(again) is NativeCrashError
    assert again.to_dict() == error.to_dict()
