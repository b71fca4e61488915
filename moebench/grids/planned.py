"""What the launcher decided for one run of a phase (`moebench.grids.phase.plan`): a frozen `PlannedRun`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moebench.training.pretrained import is_pretrain_ref
from moebench.training.spec import RunSpec

Action = Literal["run", "skip"]


@dataclass(frozen=True)
class PlannedRun:
    """One run of a phase as planned: its spec, its folder, whether to run it and why. A change (the
    run queued, held back, found running elsewhere) is a new `PlannedRun` (`replace`)."""

    spec: RunSpec
    run_dir: Path
    action: Action  # run: submit it (new, interrupted: resumed, failed and retried); skip: leave it
    why: str  # the reason in words: "done", "running elsewhere", "retry 1 of 2 after ...", ...
    state: str  # the folder's state when planned (`rundir.inspect`): new, queued, done, running, ...
    outcome: str | None = None  # "elsewhere": another process trains it (seen when queueing, or by its job)

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def pretrain(self) -> str | None:
        """The ``pretrain:<run id>`` reference its model starts from; None when it starts from scratch."""
        ref = (self.spec.model or {}).get("pretrained")
        return ref if is_pretrain_ref(ref) else None

    def replace(self, **changes) -> PlannedRun:
        return dataclasses.replace(self, **changes)
