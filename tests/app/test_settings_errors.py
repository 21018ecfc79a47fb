"""Settings mistakes stop the server with one line that names the variable, before anything loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.cli import main
from app.core.config import Settings, describe_validation_error, misspelled_variables, unknown_variables


def test_a_misspelled_setting_is_named_with_the_one_meant() -> None:
    env = {"MMFUSION_API_KEY": "secret", "MMFUSION_MAX_BATCH_SIZ": "8", "MMFUSION_PORT": "8000",
           "MMFUSION_BENCH_RUN": "runs/x", "MMFUSION_SOMETHING_ELSE_ENTIRELY": "1", "PATH": "/bin",
           # a deployment's own variables, words away from any setting: warned about, never refused
           "MMFUSION_VERSION": "1.2", "MMFUSION_BUNDLE_DIR": "/b", "MMFUSION_INDEX_DIR": "/i"}
    assert misspelled_variables(env) == [
        "MMFUSION_API_KEY is not a setting; did you mean MMFUSION_API_KEYS?",
        "MMFUSION_MAX_BATCH_SIZ is not a setting; did you mean MMFUSION_MAX_BATCH_SIZE?",
    ]
    assert unknown_variables(env) == ["MMFUSION_API_KEY", "MMFUSION_BUNDLE_DIR", "MMFUSION_INDEX_DIR",
                                      "MMFUSION_MAX_BATCH_SIZ", "MMFUSION_SOMETHING_ELSE_ENTIRELY",
                                      "MMFUSION_VERSION"]


def test_invalid_values_are_described_by_variable_and_value(monkeypatch) -> None:
    monkeypatch.setenv("MMFUSION_PORT", "99999")
    monkeypatch.setenv("MMFUSION_MAX_BATCH_SIZE", "abc")
    with pytest.raises(ValidationError) as info:
        Settings()
    text = describe_validation_error(info.value)
    assert text.startswith("invalid settings: ")
    assert "MMFUSION_PORT=99999: Input should be less than or equal to 65535" in text
    assert "MMFUSION_MAX_BATCH_SIZE=abc: Input should be a valid integer" in text


def test_log_level_is_accepted_in_any_case(monkeypatch) -> None:
    monkeypatch.setenv("MMFUSION_LOG_LEVEL", "WARNING")
    assert Settings().log_level == "warning"


@pytest.mark.parametrize(("var", "value", "expected"), [
    ("MMFUSION_API_KEY", "secret", "did you mean MMFUSION_API_KEYS?"),
    ("MMFUSION_REQUEST_TIMEOUT_S", "-1", "MMFUSION_REQUEST_TIMEOUT_S=-1: Input should be greater than or equal to 0"),
])
def test_serve_refuses_bad_settings_with_one_line_and_exit_2(monkeypatch, capsys, var: str, value: str,
                                                             expected: str) -> None:
    from app.core.config import get_settings

    get_settings.cache_clear()
    monkeypatch.setenv(var, value)
    try:
        assert main(["serve"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1


def test_uvicorn_app_main_app_refuses_bad_settings_without_a_traceback(tmp_path) -> None:
    env = {**os.environ, "MMFUSION_MAX_QUEUE_DELAY_MS": "inf"}
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0
    assert "MMFUSION_MAX_QUEUE_DELAY_MS=inf: Input should be a finite number" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_refuses_a_port_in_use_before_loading_the_model(monkeypatch, capsys, tiny_bundle) -> None:
    import socket

    from app.core.config import get_settings

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        get_settings.cache_clear()
        monkeypatch.setenv("MMFUSION_BUNDLE", str(tiny_bundle))
        for name in ("MMFUSION_HOST", "MMFUSION_PORT"):  # serve writes --host/--port there: restored after
            monkeypatch.setenv(name, "")
        try:
            assert main(["serve", "--host", "127.0.0.1", "--port", str(port)]) == 2
        finally:
            get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on port {port} of 127.0.0.1") and "MMFUSION_PORT" in err
