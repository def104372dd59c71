"""Tests for the console's epoch table rows in dml_cli.recorder."""

from dml_cli.recorder import epoch_line


def student_row(lr, train_loss=0.5, val_acc=0.9):
    return {"train_loss": train_loss, "val_acc": val_acc, "lr": lr, "time_s": 1.0}


def test_epoch_line_shared_lr_once():
    rows = [student_row(0.05), student_row(0.05), {"val_acc": 0.95, "lr": None, "time_s": 2.5}]

    line = epoch_line(3, rows)

    assert line.split() == ["3", "0.5000", "0.9000", "0.5000", "0.9000", "0.9500", "0.05", "2.5"]


def test_epoch_line_lists_each_lr():
    rows = [student_row(0.2), student_row(0.01), student_row(0.2), {"val_acc": 0.9, "time_s": 1.0}]

    line = epoch_line(1, rows)

    assert line.split()[-2] == "0.2/0.01/0.2"
