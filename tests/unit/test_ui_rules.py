"""The web UI's rules on their own, without a server or a browser: who may reach it, where it
may write, how failed logins are limited, what the Train page sends and how runs are drawn.
(tests/ui/ runs the same rules through `backprop ui` in Chromium.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from backpropagate.ui.security import (
    LoginLimiter,
    check_exposure,
    forbidden_reason,
    login_of,
    parse_credentials,
    ui_output_dir,
)
from backpropagate.ui.train_form import form_fields, train_kwargs
from backpropagate.ui.views import event_status, loss_frame, loss_point
from backpropagate_api.errors import (
    AuthRequiredError,
    ConfigError,
    LoginRateLimitedError,
    UiOutputDirForbiddenError,
)
from backpropagate_api.settings import SecuritySettings, Settings, UiSettings
from backpropagate_api.v1 import common_pb2, trainer_pb2


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home directory of the test's own (Path.home() is it), with an ~/.ssh in it."""
    home = tmp_path / "user"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return home


# --- exposure and login --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "share", "exposed"),
    [
        ("127.0.0.1", False, False),
        ("localhost", False, False),
        ("::1", False, False),
        ("0.0.0.0", False, True),
        ("192.168.1.20", False, True),
        ("127.0.0.1", True, True),
    ],
)
def test_exposing_the_ui_without_a_login_is_refused(host: str, share: bool, exposed: bool) -> None:
    settings = Settings()
    login = parse_credentials("alice:hunter2")

    assert check_exposure(host, share, login, settings) == ""  # a login: always allowed
    if exposed:
        with pytest.raises(AuthRequiredError) as refused:
            check_exposure(host, share, None, settings)
        assert refused.value.code == "INPUT_AUTH_REQUIRED"
        assert "--auth user:password" in refused.value.hint
    else:
        assert check_exposure(host, share, None, settings) == ""


def test_the_opt_out_turns_the_refusal_into_a_loud_warning() -> None:
    settings = Settings(security=SecuritySettings(require_auth_for_share=False))

    warning = check_exposure("0.0.0.0", False, None, settings)

    assert "WITHOUT A LOGIN" in warning and "REQUIRE_AUTH_FOR_SHARE=false" in warning


def test_credentials_take_user_colon_password_and_never_echo_a_bad_one() -> None:
    login = parse_credentials("alice:pass:with:colons")

    assert login.user == "alice" and login.match("alice", "pass:with:colons")
    assert not login.match("alice", "pass") and not login.match("bob", "pass:with:colons")
    assert "pass:with" not in repr(login)  # a SecretStr: it never prints
    for bad in ("s3cr3t-without-colon", ":s3cr3t-only", "carol-x:"):
        with pytest.raises(ConfigError) as refused:
            parse_credentials(bad)
        assert bad not in str(refused.value) + refused.value.hint


def test_the_login_comes_from_the_flag_else_the_setting() -> None:
    settings = Settings(ui=UiSettings(auth="bob:from-env"))  # type: ignore[arg-type]

    assert login_of("alice:from-flag", settings).user == "alice"  # type: ignore[union-attr]
    assert login_of("", settings).user == "bob"  # type: ignore[union-attr]
    assert login_of("", Settings()) is None


# --- failed logins -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_that_fails_too_often_waits_out_the_lockout_whatever_it_sends() -> None:
    clock = Clock()
    limiter = LoginLimiter(max_failures=3, lockout_seconds=60, clock=clock)

    for _ in range(2):
        limiter.failed("10.0.0.1")
        limiter.check("10.0.0.1")  # two failures: may still try
    limiter.failed("10.0.0.1")
    with pytest.raises(LoginRateLimitedError) as refused:
        limiter.check("10.0.0.1")
    limiter.check("10.0.0.2")  # another address is not held up

    assert refused.value.code == "INPUT_LOGIN_RATE_LIMITED"
    assert refused.value.context["retry_after"] == "60"
    clock.now += 61
    limiter.check("10.0.0.1")  # the lockout is over


def test_a_successful_login_clears_the_count_and_memory_stays_bounded() -> None:
    limiter = LoginLimiter(max_failures=2, lockout_seconds=60, clock=Clock(), max_addresses=3)

    limiter.failed("a")
    limiter.succeeded("a")
    limiter.failed("a")
    limiter.check("a")  # one failure since the success
    for address in ("b", "c", "d", "e"):
        limiter.failed(address)

    assert limiter.retry_after("a") == 0 and len(limiter._failures) == 3


# --- the output directory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directory", "why"),
    [
        ("/etc/backpropagate", "inside /etc"),
        ("/var/tmp/bp", "inside /var"),
        ("~/.ssh/ui", "credential"),
        ("~/.aws", "credential"),
        ("~/.cache/huggingface/ui", "credential"),
        ("~", "holds"),
        ("/", "holds"),
    ],
)
def test_system_and_credential_directories_and_those_holding_them_are_refused(
    user_home: Path, directory: str, why: str
) -> None:
    assert why in forbidden_reason(Path(directory), Settings(home=user_home / ".backpropagate"))


def test_a_link_into_a_system_directory_is_that_directory(user_home: Path) -> None:
    link = user_home / "innocent"
    link.symlink_to("/etc")

    assert "inside /etc" in forbidden_reason(link / "ui", Settings(home=user_home / ".bp"))


def test_the_default_output_dir_is_under_the_home_and_created_private(user_home: Path) -> None:
    settings = Settings(home=user_home / ".backpropagate")

    directory = ui_output_dir(settings)

    assert directory == user_home / ".backpropagate" / "ui-outputs"
    assert directory.is_dir() and directory.stat().st_mode & 0o777 == 0o700


def test_the_stack_home_itself_is_refused(user_home: Path) -> None:
    stack_home = user_home / ".backpropagate"
    settings = Settings(home=stack_home, ui=UiSettings(output_dir=stack_home))

    with pytest.raises(UiOutputDirForbiddenError) as refused:
        ui_output_dir(settings)

    assert refused.value.code == "UI_OUTPUT_DIR_FORBIDDEN" and refused.value.exit_code == 1
    assert "stack's own directory" in refused.value.message


# --- the Train page's form -----------------------------------------------------------------


def test_every_setting_starts_at_its_default_and_says_where_it_comes_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKPROPAGATE_TRAINING__LEARNING_RATE", "0.001")
    form = {field.name: field for field in form_fields(Settings())}

    assert form["learning_rate"].default == 0.001
    assert "BACKPROPAGATE_TRAINING__LEARNING_RATE" in form["learning_rate"].info
    assert form["steps"].default == 0 and "from the data's size" in form["steps"].info
    assert form["lora_r"].default == 16 and "(built-in)" in form["lora_r"].info
    assert form["method"].choices[0] == "sft" and "dpo" in form["method"].choices
    assert {"epochs", "preset", "checkpoint_every", "oom_recovery"} <= set(form)


def test_only_the_settings_a_user_changed_are_sent() -> None:
    form = form_fields(Settings())
    values = {field.name: field.default for field in form}
    values |= {"steps": 3, "target_modules": "q_proj, v_proj", "oom_recovery": False}
    values["seed"] = None  # an emptied number

    given = train_kwargs(form, [values[field.name] for field in form])

    assert given == {"steps": 3, "target_modules": ["q_proj", "v_proj"], "oom_recovery": False}


# --- how a run is drawn --------------------------------------------------------------------


def test_a_run_s_events_become_chart_points_and_one_status_line() -> None:
    step = trainer_pb2.RunEvent(
        kind="step",
        step=2,
        total_steps=5,
        loss=1.5,
        tokens_per_second=120,
        eta_seconds=9,
        safety_level=common_pb2.SAFETY_LEVEL_WARM,
    )
    evaluated = trainer_pb2.RunEvent(kind="eval", step=2, eval_loss=1.7)
    campaign_step = trainer_pb2.RunEvent(kind="step", step=1, loss=2.0, campaign_run=2)

    assert loss_point(step) == (2, 1.5, "train")
    assert loss_point(evaluated) == (2, 1.7, "eval")
    assert loss_point(campaign_step) == (1, 2.0, "run 2 train")
    assert loss_point(trainer_pb2.RunEvent(kind="checkpoint", step=2)) is None
    assert event_status(step) == "step 2/5 · loss 1.5000 · 120 tokens/s · ETA 9 s · safety: warm"


def test_a_chart_holds_every_series_from_its_first_frame_and_numbers_on_its_axes() -> None:
    empty = loss_frame([])
    started = loss_frame([(1, 2.5, "train")], series=("train", "eval"))

    assert [str(dtype) for dtype in empty.dtypes[:2]] == ["float64", "float64"]
    assert list(empty["series"]) == ["train", "eval"] and empty["loss"].isna().all()
    assert started.values.tolist()[0] == [1.0, 2.5, "train"]
    assert list(started["series"]) == ["train", "eval"]  # eval: a row with no point yet
