"""Progress bars in a log file: updates at most every LOG_INTERVAL_S seconds, not per step."""

import io
import sys

from saeot.progress import LOG_INTERVAL_S, progress_bar, trainer_progress_callbacks


def test_bar_writes_a_few_lines_when_stderr_is_not_a_terminal(monkeypatch):
    err = io.StringIO()  # not a TTY, like a batch job's log
    monkeypatch.setattr(sys, "stderr", err)
    for _ in progress_bar(range(20000), desc="steps", mininterval=0.01):
        pass
    bar = progress_bar(total=5000, desc="pairs", dynamic_ncols=True)
    for _ in range(5000):
        bar.update(1)
    bar.set_postfix(loss=1.0, refresh=False)
    bar.close()
    text = err.getvalue()
    assert LOG_INTERVAL_S >= 10
    assert text.count("\r") <= 6, text.count("\r")  # first and last state of each bar
    assert "20000/20000" in text and "5000/5000" in text  # the final state stays in the log
    assert progress_bar(range(3), enabled=False).disable


def test_trainer_gets_a_one_line_bar_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bars = trainer_progress_callbacks({"enable_progress_bar": True})
    assert [type(b).__name__ for b in bars] == ["RichProgressBar"]
    assert trainer_progress_callbacks({"enable_progress_bar": False}) == []
