"""Optional experiment loggers, chosen with the `logger` config group.

metrics.csv is written for every run by the run recorder. `logger=tensorboard` adds TensorBoard
event files under `<run_dir>/tensorboard`; view them with `tensorboard --logdir outputs`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from dml_cli.engine import DMLTrainer
from dml_cli.errors import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
DEFAULT_FLUSH_SECS = 30

# History row columns and the `<split>/<metric>` tag each is written under.
EPOCH_SCALARS = {
    "train_loss": "train/loss",
    "train_ce_loss": "train/ce_loss",
    "train_kl_loss": "train/kl_loss",
    "train_acc": "train/acc",
    "val_loss": "val/loss",
    "val_acc": "val/acc",
    "lr": "lr",
}


def build_loggers(cfg: DictConfig, run_dir: Path | str) -> list:
    """Return the trainer callbacks that `cfg.logger` turns on (none for `logger=csv`).

    Raises ConfigError when `logger=tensorboard` is chosen but TensorBoard is not installed, or
    when `logger.flush_secs` is not a positive number.
    """
    logger_cfg = cfg.get("logger") or {}
    if not logger_cfg.get("tensorboard", False):
        return []
    flush_secs = logger_cfg.get("flush_secs", DEFAULT_FLUSH_SECS)
    if isinstance(flush_secs, bool) or not isinstance(flush_secs, int | float) or flush_secs <= 0:
        raise ConfigError(
            f"Invalid logger.flush_secs={flush_secs!r}: it must be a number of seconds > 0."
        )
    return [TensorBoardLogger(Path(run_dir) / TENSORBOARD_DIR, flush_secs=flush_secs)]


class TensorBoardLogger:
    """Trainer callback that writes per-student scalars to TensorBoard event files.

    Every `trainer.log_every_steps` steps it writes `train/running_loss/<student>`, the mean
    train loss of the epoch so far. After each epoch it writes `train/{loss,ce_loss,kl_loss,acc}`
    and `val/{loss,acc}` per student, `val/{loss,acc}/ensemble` and `lr/<student>`. The global
    step of every scalar is `trainer.step`, the number of optimizer steps of the cohort, which
    keeps increasing across epochs and resumed runs.
    """

    def __init__(self, log_dir: Path | str, flush_secs: float = DEFAULT_FLUSH_SECS):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                "logger=tensorboard needs the tensorboard package, which is not installed: "
                'pip install -e ".[tensorboard]" in the dml_cli checkout, or use logger=csv.'
            ) from err
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self.writer = None

    def on_train_start(self, trainer: DMLTrainer) -> None:
        # A resumed run drops events at or past its restored step, which the interrupted
        # process may have written after its last checkpoint.
        purge_step = trainer.step if trainer.step > 0 else None
        self.writer = self._writer_class(
            str(self.log_dir), flush_secs=self.flush_secs, purge_step=purge_step
        )
        log.info(f"TensorBoard event files in {self.log_dir}")

    def on_log(self, trainer: DMLTrainer, means: dict) -> None:
        for name, values in means.items():
            self.writer.add_scalar(
                f"train/running_loss/{name}", values["train_loss"], global_step=trainer.step
            )

    def on_epoch_end(self, trainer: DMLTrainer, rows: list[dict]) -> None:
        for row in rows:
            for column, tag in EPOCH_SCALARS.items():
                if column in row and row[column] is not None:
                    self.writer.add_scalar(
                        f"{tag}/{row['student']}", row[column], global_step=trainer.step
                    )
        # NOTE: a run stopped by an error or a signal never reaches on_train_end, so scalars
        # logged after this flush are lost unless the writer's flush_secs timer wrote them.
        self.writer.flush()

    def on_train_end(self, trainer: DMLTrainer) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
