"""The quiet console: engine output goes to the run's log file, only the person-facing lines reach
the terminal, and the terminal is restored afterwards (also when the body raises)."""

import subprocess
import sys
import textwrap

from cluster.console import format_round_accuracy

SCRIPT = textwrap.dedent(
    """
    import logging, os, subprocess, sys
    from pathlib import Path
    from cluster.console import Console

    logging.basicConfig(level=logging.INFO)
    log_path = Path(sys.argv[1])
    with Console.quiet(log_path) as console:
        print("python print")
        os.write(1, b"native fd write\\n")
        logging.getLogger("engine").warning("engine warning")
        subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
        console.line("for the person")
        bar = console.progress(3)
        bar.update(3)
        bar.close()
    print("after the run")
    try:
        with Console.quiet(log_path):
            raise RuntimeError("boom")
    except RuntimeError:
        print("restored after an error")
    """
)


def test_quiet_console_sends_engine_output_to_the_log(tmp_path):
    log_path = tmp_path / "run" / "engine.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.replace("\r", "\n").splitlines() if x.strip()]
    bar = [x for x in lines if x.startswith("R3RL:")]
    assert bar and "3/3" in bar[-1]  # the progress bar is drawn on the terminal
    assert [x for x in lines if x not in bar] == ["for the person", "after the run", "restored after an error"]
    assert out.stderr == ""
    logged = log_path.read_text()
    for text in ("python print", "native fd write", "engine warning", "child process", "for the person"):
        assert text in logged
    assert "after the run" not in logged


def test_format_round_accuracy():
    assert format_round_accuracy([0.125, 0.5]) == "round 0 12.5 % | round 1 50.0 %"
    assert format_round_accuracy([]) == ""


def test_python_level_writers_go_to_the_log_even_when_stdout_is_not_fd_1(tmp_path, capsys):
    """Under pytest's capture (or in a notebook) `sys.stdout` is not fd 1; Ray prints its actors'
    lines to whatever `sys.stdout` is, so the quiet console swaps the objects too."""
    import sys as _sys

    from cluster.console import Console

    before = _sys.stdout
    with Console.quiet(tmp_path / "engine.log"):
        print("forwarded actor line")
    assert _sys.stdout is before
    assert "forwarded actor line" not in capsys.readouterr().out
    assert "forwarded actor line" in (tmp_path / "engine.log").read_text()
