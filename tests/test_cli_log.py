"""The CLI's console log follows sys.stderr: several main() calls in one process (tests, notebooks) with
sys.stderr swapped in between never write to a closed stream."""
import io
import sys

from flowsan_lib import cli


def test_console_log_writes_to_the_current_stderr(monkeypatch, tmp_path):
    import logging
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    assert cli.main(["params", "smoke"]) == 0
    first.close()                                         # the stream a stale handler would still hold
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("flowsan.run").info("a line after the swap")
    assert "a line after the swap" in second.getvalue() and "Logging error" not in second.getvalue()
    assert sum(isinstance(h, cli._Stderr) for h in logging.getLogger("flowsan").handlers) == 1
    cli.main(["params", "smoke"])
    assert sum(isinstance(h, cli._Stderr) for h in logging.getLogger("flowsan").handlers) == 1
