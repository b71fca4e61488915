"""``train.log_to``: mirror each metrics.jsonl line to TensorBoard and / or Weights & Biases.

Why: people watch a grid in the tools they already use. The run folder stays the record: these writers
get exactly the numbers of metrics.jsonl (`scalars` flattens one line), only on rank 0, and a tracker
that is not installed fails the run at set-up with the extra to install, never silently. W&B runs
offline (``WANDB_MODE=offline`` unless the user set a mode), into the run folder, with no network.
"""

from __future__ import annotations

import os
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"  # <run_dir>/tensorboard/: event files
WANDB_DIR = "wandb"  # <run_dir>/wandb/: the offline W&B run


def scalars(line: dict) -> dict[str, float]:
    """One metrics.jsonl line as flat ``tag -> number``: ``train_loss``, ``aux_loss``, ``lr``,
    ``metrics/<name>``, ``routing/<stat>`` (mean over layers), ``routing/<stat>.layer<i>`` (i = the MoE
    layer's index in order, as in runs.csv). Non-numbers (None, lists) are left out."""
    out: dict[str, float] = {}

    def put(tag, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)

    for key in ("train_loss", "aux_loss", "lr"):
        put(key, line.get(key))
    for key, value in (line.get("metrics") or {}).items():
        put(f"metrics/{key}", value)
    routing = line.get("routing") or {}
    for key, value in (routing.get("mean") or {}).items():
        put(f"routing/{key}", value)
    for i, layer in enumerate(routing.get("per_layer") or []):
        for key, value in layer.items():
            put(f"routing/{key}.layer{i}", value)
    return out


class Trackers:
    """The writers ``log_to`` names, opened on rank 0 only (``enabled`` False: every call is a no-op)."""

    def __init__(
        self, log_to, run_dir, run_id: str, config: dict | None = None, enabled: bool = True, start_step: int = 0
    ):
        """``start_step``: the step the run resumes from (0: a fresh start); TensorBoard events after it,
        left by an interrupted attempt, are purged, as metrics.jsonl's lines after it were."""
        self.tb = self.wandb_run = None
        self.wandb_dir: Path | None = None
        if not enabled or not log_to:
            return
        run_dir = Path(run_dir)
        if "tensorboard" in log_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    f"train.log_to names tensorboard, which is not installed ({err}); "
                    f"pip install 'moebench[trackers]' or leave it out of log_to"
                ) from err
            self.tb = SummaryWriter(
                log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else 0
            )
        if "wandb" in log_to:
            try:
                import wandb
            except ImportError as err:
                raise ImportError(
                    f"train.log_to names wandb, which is not installed ({err}); "
                    f"pip install 'moebench[trackers]' or leave it out of log_to"
                ) from err
            self.wandb_dir = run_dir / WANDB_DIR
            self.wandb_dir.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "moebench"),
                name=run_id,
                id=run_id,
                dir=str(run_dir),
                mode=os.environ.get("WANDB_MODE", "offline"),
                config=config or {},
                resume="allow",
                settings=wandb.Settings(silent=True, symlink=False),
            )

    def log(self, line: dict) -> None:
        values, step = scalars(line), int(line["step"])
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
            _unlink_links(self.wandb_dir)


def _unlink_links(folder: Path | None) -> None:
    """Remove the symbolic links W&B leaves in its folder (``logs/debug-core.log`` points at a log in the
    user's cache): a run folder holds plain files only, and a link out of a shared results folder would
    lead readers elsewhere."""
    if folder is None or not folder.is_dir() or folder.is_symlink():
        return
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            path.unlink()
