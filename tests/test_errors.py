"""comoe.errors: which exceptions are user errors (one line, exit 2) and how the command line treats each."""

import pytest

from comoe import cli
from comoe.errors import USER_ERRORS, Interrupted, NonFiniteLoss


def run_demo_raising(monkeypatch, error: BaseException) -> int:
    """`comoe demo` with its handler replaced by one that raises `error` (no model is loaded)."""

    def handler(args):
        raise error

    settings, _, help_text = cli.COMMANDS["demo"]
    monkeypatch.setitem(cli.COMMANDS, "demo", (settings, handler, help_text))
    return cli.main(["demo"])


def test_the_error_types_sit_where_callers_catch_them():
    assert issubclass(NonFiniteLoss, RuntimeError) and not issubclass(NonFiniteLoss, ValueError)
    assert issubclass(Interrupted, KeyboardInterrupt) and not issubclass(Interrupted, Exception)
    assert isinstance(NonFiniteLoss("x"), USER_ERRORS)
    assert not isinstance(Interrupted("x"), USER_ERRORS)  # reported as an interruption, not an error
    assert not isinstance(RuntimeError("x"), USER_ERRORS)  # a bug keeps its traceback
    for error in (
        ValueError("x"),
        FileNotFoundError("x"),
        FileExistsError("x"),
        ImportError("x"),
        OSError("x"),
    ):
        assert isinstance(error, USER_ERRORS), error


@pytest.mark.parametrize(
    "error",
    [
        NonFiniteLoss("step 3: non-finite task loss"),
        ValueError("step 3: non-finite task loss"),
        OSError("step 3: non-finite task loss"),
    ],
)
def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys, error):
    assert run_demo_raising(monkeypatch, error) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["comoe: error: step 3: non-finite task loss (run with --debug for the traceback)"]


def test_a_multi_line_user_error_is_joined_into_one_line(monkeypatch, capsys):
    assert run_demo_raising(monkeypatch, NonFiniteLoss("first\n\n  second  \n")) == 2
    assert (
        capsys.readouterr().err.strip() == "comoe: error: first; second (run with --debug for the traceback)"
    )


def test_interrupted_says_where_training_stopped_and_exits_130(monkeypatch, capsys):
    message = "interrupted at step 3 of 4; the last checkpoint is step-000002"
    assert run_demo_raising(monkeypatch, Interrupted(message)) == cli.INTERRUPTED == 130
    assert capsys.readouterr().err.strip() == f"comoe: {message}"


def test_an_error_that_is_not_the_users_keeps_its_traceback(monkeypatch):
    with pytest.raises(RuntimeError, match="a bug"):
        run_demo_raising(monkeypatch, RuntimeError("a bug"))
