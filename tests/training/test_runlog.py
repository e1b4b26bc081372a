"""comoe.training.runlog: one JSON line per step (flushed at once, appended on resume), TensorBoard tags for
training and validation values, the progress bar from the resumed step, nothing at all off the main process."""

import json

from comoe.training import runlog
from comoe.training.runlog import RunLog


class RecordingWriter:
    """Stands in for tensorboardX's SummaryWriter: records add_scalar calls."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.scalars = []
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def row(step, **extra):
    return {"step": step, "task": 2.5 - step / 10, "contrastive": 0.125, "balance": 0.0, "lr": 1e-3, **extra}


def test_each_row_is_one_json_line_readable_before_close(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "SummaryWriter", RecordingWriter)
    log = RunLog(tmp_path, total=4, step=0, enabled=True)
    log.write(row(1))
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [row(1)]
    log.write(row(2, val_loss=1.5))
    log.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [row(1), row(2, val_loss=1.5)]
    assert log.file.closed and log.writer.closed


def test_values_go_to_tensorboard_under_train_and_validation_tags(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "SummaryWriter", RecordingWriter)
    log = RunLog(tmp_path, total=4, step=0, enabled=True)
    log.write(row(3, **{"val_loss": 1.25, "val_loss/boolq": 1.5}))
    log.close()
    assert log.writer.logdir == str(tmp_path / "tensorboard")
    assert sorted(log.writer.scalars) == sorted(
        [
            ("train/task", 2.2, 3),
            ("train/contrastive", 0.125, 3),
            ("train/balance", 0.0, 3),
            ("train/lr", 1e-3, 3),
            ("validation/loss", 1.25, 3),
            ("validation/loss/boolq", 1.5, 3),
        ]
    )  # the step is the x axis, not a scalar


def test_a_resumed_run_appends_and_its_progress_starts_at_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "SummaryWriter", RecordingWriter)
    first = RunLog(tmp_path, total=4, step=0, enabled=True)
    first.write(row(1))
    first.write(row(2))
    first.close()
    second = RunLog(tmp_path, total=4, step=2, enabled=True)
    assert second.progress.n == 2 and second.progress.total == 4
    second.write(row(3))
    assert second.progress.n == 3
    second.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]


def test_a_disabled_log_writes_nothing(tmp_path):
    log = RunLog(tmp_path, total=4, step=0, enabled=False)
    log.write(row(1))
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_the_real_writer_leaves_an_event_file(tmp_path):
    log = RunLog(tmp_path, total=1, step=0, enabled=True)
    log.write(row(1))
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_the_progress_bar_shows_every_named_loss_component(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog, "SummaryWriter", RecordingWriter)
    log = RunLog(tmp_path, total=2, step=0, enabled=True)
    log.write(row(1, orthogonality=0.25), components=["task", "balance", "contrastive", "orthogonality"])
    shown = dict(log.progress.postfix.split(", ")[i].split("=") for i in range(4))
    log.close()
    assert shown == {"task": "2.400", "balance": "0.000", "contrastive": "0.125", "orthogonality": "0.250"}
