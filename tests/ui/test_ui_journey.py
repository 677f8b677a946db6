"""The whole loop in a browser: headless Chromium drives `backprop ui` (the embedded default, the
real SmolLM2) through every page, in order, as one user would. Each test is one step of that
journey and saves a screenshot of its page (build/ui-screenshots/; the Train page also to the
README's docs/images/ui-train.png); the steps share one UI process and one browser, and a later
step uses what an earlier one made (the dataset, the runs, the export).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ollama_test_server import OllamaTestServer, running_ollama_test_server
from ui_browser import UiPage, chromium
from ui_server import README_IMAGE, SCREENSHOTS, UiServer, ui_process

pytestmark = [pytest.mark.model, pytest.mark.llama, pytest.mark.browser]

RUN_ID = re.compile(r"run-\d{8}T\d{6}-[0-9a-f]{6}")


@dataclass
class Journey:
    page: UiPage
    server: UiServer
    ollama: OllamaTestServer  # a loopback stand-in for Ollama's API (OLLAMA_HOST)
    runs: dict[str, str] = field(default_factory=dict)  # what each run was for: its id


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Journey]:
    home = tmp_path_factory.mktemp("ui-journey-home")
    with (
        running_ollama_test_server() as ollama,
        ui_process(
            home, BACKPROPAGATE_MODEL_CACHE=str(model_cache), OLLAMA_HOST=ollama.url
        ) as server,
        chromium(tmp_path_factory.mktemp("chromium-profile")) as driver,
    ):
        page = UiPage(driver, server.url, SCREENSHOTS)
        page.open()
        yield Journey(page, server, ollama)


def test_the_data_page_shows_an_upload_as_training_will_see_it(
    journey: Journey, quickstart: Path
) -> None:
    page = journey.page
    page.upload("data-upload", quickstart)

    summary = page.wait_for_text("data-summary", "max_length", timeout=120)
    assert "format: sharegpt" in summary and "10 of 10 rows" in summary
    assert "every row kept" in summary
    assert re.search(r"tokens \(SmolLM2-135M-Instruct\): [\d,]+ in 10 rows", summary), summary
    first_row = page.text("data-first-row")
    assert "<|im_start|>assistant" in first_row and "trained" in first_row  # highlighted
    page.screenshot("data")


def test_the_train_page_prefills_every_setting_with_its_default_and_the_reason(
    journey: Journey,
) -> None:
    page = journey.page
    page.tab("Train")

    page.wait_for_text("train-dataset", "quickstart.jsonl")
    page.wait_for(lambda: page.value("train-learning-rate") == "0.0002", "the default rate")
    assert "Default: 0.0002 (built-in)" in page.text("train-learning-rate")
    assert "from the data's size" in page.text("train-steps")
    assert "sft" in page.value("train-method") and "lora" in page.value("train-adapter")


def test_a_run_started_on_the_train_page_draws_its_loss_live_and_finishes(
    journey: Journey,
) -> None:
    page = journey.page
    for elem_id, value in [("train-steps", 3), ("train-max-length", 96), ("train-batch-size", 2)]:
        page.fill(elem_id, value)
    page.click("train-start")

    page.wait_for_text("train-memory", "predicted peak")
    first = page.wait_for(lambda: page.chart_points("train-chart"), "a first point", 300)
    status = page.wait_for_text("train-status", "succeeded", timeout=300)
    points = page.wait_until(
        lambda: page.chart_points("train-chart"), lambda drawn: len(drawn) == 3, "the curve"
    )
    assert len(first) < len(points), (first, points)  # drawn while it ran, then whole
    assert all("series: train" in point for point in points)
    assert "3 steps" in status and "tokens/s" not in status
    record = page.wait_for_text("train-record", "status: succeeded")
    assert "steps: 3" in record
    journey.runs["trained"] = page.value("train-run-id")
    assert RUN_ID.fullmatch(journey.runs["trained"])
    page.driver.execute_script("window.scrollTo(0, 0)")
    page.screenshot("train", to=README_IMAGE, whole=False)
    page.screenshot("train")


def test_cancel_stops_a_running_run_before_its_next_step(journey: Journey) -> None:
    page = journey.page
    page.fill("train-steps", 500)
    page.click("train-start")

    running = page.wait_for_text("train-status", "step 1/500", timeout=300)
    assert "tokens/s" in running and "ETA" in running and "safety: " in running
    page.click("train-cancel")
    page.wait_for_text("train-status", "cancelled", timeout=120)
    journey.runs["cancelled"] = page.value("train-run-id")
    assert journey.runs["cancelled"] != journey.runs["trained"]


def test_the_runs_page_filters_the_history_and_compares_two_runs(journey: Journey) -> None:
    page = journey.page
    page.tab("Runs")
    history = page.wait_for_text("runs-history", journey.runs["cancelled"])
    assert journey.runs["trained"] in history
    page.choose("runs-status", "cancelled")
    page.wait_until(
        lambda: page.text("runs-history"),
        lambda shown: journey.runs["cancelled"] in shown and journey.runs["trained"] not in shown,
        "the history filtered to the cancelled run",
    )

    page.fill("runs-run-id", journey.runs["trained"])
    page.click("runs-show")
    record = page.wait_for_text("runs-record", "status: succeeded")
    assert journey.runs["trained"] in record
    curve = page.wait_until(
        lambda: page.chart_points("runs-chart"), lambda points: len(points) == 3, "its curve"
    )
    assert all("series: train" in point for point in curve)
    assert "step" in page.wait_for_text("runs-checkpoints", "checkpoints")
    page.fill("runs-compare-left", journey.runs["trained"])
    page.fill("runs-compare-right", journey.runs["cancelled"])
    page.click("runs-compare")
    comparison = page.wait_for_text("runs-comparison", "config.steps")
    assert "succeeded" in comparison and "cancelled" in comparison
    page.screenshot("runs")


def test_the_export_page_exports_f16_with_its_report_and_hands_it_to_ollama(
    journey: Journey,
) -> None:
    page = journey.page
    page.tab("Export")
    page.choose("export-run", journey.runs["trained"])
    page.choose("export-quantization", "f16")
    page.element("export-ollama-register", "input[type=checkbox]").click()
    page.fill("export-ollama-name", "smol-ui")
    page.click("export-start")

    page.wait_for_text("export-progress", "stage", timeout=300)
    page.wait_for_text("export-progress", "exported", timeout=600)
    report = page.wait_for_text("export-report", "quantization: f16")
    agreement = re.search(r"agreement with torch: ([\d.]+)% top-1", report)
    assert agreement and float(agreement.group(1)) >= 99.0, report
    assert "smoke answer" in report
    (gguf,) = (journey.server.output_dir / "exports").glob("*.gguf")
    assert gguf.stem in page.text("export-file")  # offered for download
    assert "ollama run smol-ui" in page.wait_for_text("export-ollama", "registered", 120)
    assert "<|im_start|>" in journey.ollama.models["smol-ui"]["template"]
    page.screenshot("export")


def test_the_chat_page_answers_with_the_exported_model(journey: Journey) -> None:
    page = journey.page
    page.tab("Chat")
    page.wait_for(lambda: page.value("chat-model").endswith(".gguf"), "the export picked")
    page.fill("chat-message", "What is the capital of France?")
    page.click("chat-send")

    answer = page.wait_for(
        lambda: [
            bubble.text
            for bubble in page.element("chat-history").find_elements(
                "css selector", "[data-testid=bot]"
            )
            if bubble.text.strip()
        ],
        "an answer",
        timeout=120,
    )
    assert answer[-1].strip()
    page.screenshot("chat")


def test_the_multi_run_page_shows_a_campaign_and_its_merge_timeline(journey: Journey) -> None:
    page = journey.page
    page.tab("Multi-run")
    for elem_id, value in [("multi-runs", 2), ("multi-steps", 1), ("multi-max-length", 64)]:
        page.fill(elem_id, value)
    page.click("multi-start")

    page.wait_for_text("multi-timeline", "merge timeline", timeout=600)
    page.wait_for_text("multi-status", "succeeded", timeout=600)
    timeline = page.wait_until(
        lambda: page.text("multi-timeline"),
        lambda text: len(RUN_ID.findall(text)) == 2,
        "both runs merged, in order",
    )
    assert "slao" in timeline
    page.wait_for(
        lambda: any("series: run 2 train" in p for p in page.chart_points("multi-chart")),
        "the second run's curve",
    )
    page.screenshot("multi-run")


def test_a_run_goes_on_when_its_page_is_closed_and_is_taken_up_again(journey: Journey) -> None:
    page = journey.page
    page.tab("Train")
    page.fill("train-steps", 4)
    page.click("train-start")
    page.wait_for_text("train-status", "step 1/4", timeout=300)
    run_id = page.value("train-run-id")

    page.driver.get("about:blank")  # the page is gone: nobody watches the run
    page.open()
    page.tab("Train")
    page.fill("train-run-id", run_id)
    page.click("train-watch")

    page.wait_for_text("train-status", "succeeded: 4 steps", timeout=300)
    assert "status: succeeded" in page.wait_for_text("train-record", run_id)


def test_the_browser_talked_to_nothing_but_the_ui(journey: Journey) -> None:
    assert journey.page.hosts_contacted() == {f"127.0.0.1:{journey.server.port}"}
