"""The one training / evaluation loop every task uses.

Why one loop: routers are compared under identical conditions only if everything around them (data
order, optimiser, schedule, precision, evaluation, statistics) is the same code.

- Reproducible: seeds torch / numpy / random; the data order is a pure function of (seed, step), so a
  resumed run draws exactly the batches an uninterrupted one would; deterministic kernels on CPU
  (and on CUDA with ``train.deterministic: true``), so a resumed run ends bit-identical.
- Loss = task loss + the MoE layers' auxiliary losses; ``after_step()`` of every MoE layer after each
  optimiser step. AdamW, linear warmup then cosine decay to 0, gradient clipping, bf16 autocast on CUDA.
- Every ``eval_every`` steps and at the end (and at step 0 when the model has MoE layers: the routing
  before any learning, e.g. ``first_choice_max_share_init``): task metrics and routing statistics over
  the eval set; one line of ``metrics.jsonl`` each (schema in ``moebench.training.records``).
- Every ``probe_every`` steps (and at every evaluation): the fixed probe samples (the first
  ``probe_size`` eval samples) are routed on their own, no task metrics, so stability (switch rate,
  last fluctuation, moved from init) has >= 10 points per run at the cost of a few small forwards.
- ``checkpoint.pt`` (atomic) every ``checkpoint_every`` steps and at each evaluation; a rerun resumes
  from it and ends with the same metrics as an uninterrupted run.
- NaN / inf / loss above ``max_loss``: the run stops with status failed ("diverged at step 37:
  loss=nan"); no exception escapes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from moebench.core.compile import compile_blocks
from moebench.core.cost import model_cost
from moebench.core.device import to_device
from moebench.core.layer import MoELayer
from moebench.core.progress import Progress
from moebench.training import metrics as M
from moebench.training.gradprobe import grad_cosine, mean_cos, probe_due
from moebench.training.pretrained import with_weights_path
from moebench.training.records import (
    EVAL_ITEMS_FILE,
    PROBE_TOP1_FILE,
    STATES,
    append_jsonl,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    environment_info,
    json_default,
    read_jsonl,
    read_status_safe,
    remove_temp_files,
    write_eval_items,
    write_probe_top1,
    write_status,
)
from moebench.training.rundir import set_aside
from moebench.training.spec import RunSpec
from moebench.training.stop import STOP_REQUESTED, Stopped, stop_on_signals
from moebench.training.trackers import Trackers

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 2  # 2: plain types only (weights_only); a version-1 checkpoint restarts its run


class Diverged(RuntimeError):
    """The loss became NaN / inf or exceeded ``train.max_loss``."""


# ----------------------------------------------------------------------------------------------------
# small helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so (seed, epoch) pairs never collide in practice."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2)) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        h ^= h >> 31
    return h & (2**63 - 1)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of epoch ``epoch`` from a permutation seeded by (seed, epoch), starting at batch
    ``start``; incomplete last batches are dropped so every step has the same batch size. Under data
    parallelism rank ``rank`` of ``world`` takes its equal share of each (global) batch."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 1))
        perm = torch.randperm(self.n, generator=g).tolist()
        share = self.batch_size // self.world
        for b in range(self.start, self.n // self.batch_size):
            first = b * self.batch_size + self.rank * share
            yield perm[first : first + share]


def _worker_init(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


def train_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start_step: int,
    num_workers: int = 0,
    collate_fn=None,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
):
    """Infinite iterator over training batches; batch number ``s`` (0-based) depends only on (seed, s)
    (with ``world`` > 1: this rank's share of it)."""
    n = len(dataset)  # type: ignore[arg-type]  # map-style datasets have __len__; torch's Dataset type does not say so
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"the training set has {n} samples, fewer than train.batch_size={batch_size}; "
            f"lower train.batch_size or enlarge the task's training set"
        )
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        loader = DataLoader(
            dataset,
            batch_sampler=EpochBatchSampler(n, batch_size, seed, epoch, offset, rank, world),
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            worker_init_fn=_worker_init if num_workers else None,
            generator=torch.Generator().manual_seed(_mix(seed, epoch, 2)),  # never touch the global RNG
        )
        for batch in loader:
            yield batch
            step += 1


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based): linear warmup from 1/warmup to
    1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """AdamW groups: decay matrices; no decay on biases (incl. experts' b1 / b2), norms (1-D) and what
    the model lists in ``no_weight_decay()`` (timm's convention, e.g. pos_embed). Parameters carrying
    an ``lr_scale`` attribute (e.g. ERMoE's ``eigen_lr_scale``) get groups of their own at lr * scale,
    after the two base groups."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()  # type: ignore[operator]
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        decays = not (p.ndim < 2 or leaf in ("bias", "b1", "b2") or name in skip or leaf in skip)
        scale = float(getattr(p, "lr_scale", 1.0)) if lr is not None else 1.0
        groups.setdefault((decays, scale), []).append(p)
    out = []
    for (decays, scale), params in groups.items():
        if scale != 1.0 and not params:
            continue
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if scale != 1.0:
            assert lr is not None  # scale is 1.0 unless lr is given
            group["lr"] = lr * scale
        out.append(group)
    return out


def _set_deterministic(mode: bool, warn_only: bool, compiled: bool = False) -> None:
    """``torch.use_deterministic_algorithms``, without importing torch._inductor when nothing has: the
    public call imports it (~2-4 s on one CPU) only to set inductor's own flag, which matters to compiled
    code alone; a run that compiles (``compiled``), or a process that has imported inductor, gets it."""
    if compiled or "torch._inductor.config" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


@contextlib.contextmanager
def deterministic(device: torch.device, mode="auto", compiled: bool = False):
    """Deterministic kernels for the duration (the flags are global, so they are restored after).
    ``auto``: on CPU only (free there); ``True`` on CUDA too (cuBLAS workspace config, cuDNN
    deterministic: reruns and resumes become bit-identical, some kernels get slower)."""
    on = mode is True or (mode == "auto" and device.type == "cpu")
    if not on:
        yield
        return
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    old_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    _set_deterministic(True, warn_only=True, compiled=compiled)
    try:
        yield
    finally:
        _set_deterministic(old, warn_only=old_warn, compiled=compiled)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old_cudnn


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated by torch; CPU: the process's peak resident set size (Linux ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024 if sys.platform != "darwin" else rss / 2**20
    except (ImportError, OSError):
        return float("nan")


def data_parallel() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group (the grid launcher sets it up from
    submitit's environment, one process per GPU); (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(model: nn.Module, world: int) -> None:
    """Data parallelism's one collective: every rank's gradients replaced by their mean over ranks,
    as one flat all-reduce (a parameter without a gradient on this rank counts as zeros)."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def force_eager():
    """A context in which compiled modules run eager (torch >= 2.6: set_stance; before: dynamo off)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else torch._dynamo.config.patch(disable=True)


class _TokenCounter:
    """Tokens per sample, read from the first forward of the first MoE layer (or first block)."""

    def __init__(self, model: nn.Module):
        self.per_sample: float | None = None
        self.module: nn.Module | None = next((m for m in model.modules() if isinstance(m, MoELayer)), None)
        if self.module is None:  # dense baseline: the first transformer block moefy would see (timm, CLIP, 3D)
            try:
                from moebench.core.moefy import find_blocks

                self.module = find_blocks(model)[0].block
            except (ValueError, IndexError):
                self.module = None
        self.batch_size: int | None = None
        self.handle = self.module.register_forward_hook(self._hook) if self.module is not None else None

    def _hook(self, module, inputs, output):
        if not self.batch_size:  # a forward outside the training loop (e.g. the step-0 evaluation): not ours
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.dim() >= 2:
            self.per_sample = out.shape[:-1].numel() / self.batch_size
        self.close()

    def close(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _rng_state() -> dict:
    """RNG states as tensors and plain containers only, so the checkpoint loads with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # type: ignore[attr-defined]  # numpy stub: may be a dict
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(obj):
    """``obj`` as JSON-able plain types (numpy scalars / arrays -> floats / lists, tuples -> lists): what a
    checkpoint loaded with ``weights_only=True`` may hold, and what final.json would hold anyway."""
    return json.loads(json.dumps(obj, default=json_default))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines written after the checkpoint we resume from (they will be redone), and a torn
    last line (killed mid-append), so the next append never glues onto a fragment."""
    if not path.exists():
        return
    rows = read_jsonl(path)
    kept = [r for r in rows if int(r.get("step", 0)) <= last_step]
    if len(kept) == len(rows) and path.read_bytes().endswith(b"\n"):
        return

    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


# ----------------------------------------------------------------------------------------------------
# the loop


def train(
    task,
    spec: RunSpec | dict,
    run_dir,
    device=None,
    progress: bool | None = None,
    on_step: Callable[[int], None] | None = None,
    results=None,
) -> dict:
    """Train and evaluate ``task`` as ``spec`` says, recording into ``run_dir``; returns the final record
    (also written to ``final.json``), or ``{"state": "failed", "reason": ...}`` after a divergence
    (status.json says so too). ``on_step(step)`` runs after each completed step (tests use it to
    interrupt a run). ``progress``: None = a bar on a TTY, a line every 30 s in a log
    (`moebench.core.progress`); True = always the bar; False = silent. ``results``: the results root a
    ``model.pretrained: "pretrain:<run id>"`` reference resolves under (`moebench.training.pretrained`)."""
    run = RunSpec.from_dict(spec)  # a RunSpec passes through: resolved once, where it was made
    rid = run.run_id
    spec = with_weights_path(run, results)  # a plain dict, after the id: the id names the pretrain, not a path
    run_dir = Path(run_dir)
    if data_parallel()[0] == 0:  # other data-parallel ranks write nothing
        run_dir.mkdir(parents=True, exist_ok=True)
    t = spec["train"]
    if device is None and torch.cuda.is_available() and data_parallel()[1] > 1:  # one GPU per process
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    amp_dtype = torch.bfloat16 if device.type == "cuda" and t["amp"] in ("auto", True) else None
    with deterministic(device, t["deterministic"], compiled=bool(t["compile"])), stop_on_signals():
        return _Trainer(task, spec, rid, run_dir, device, amp_dtype, progress, on_step).run()


class _Trainer:
    def __init__(self, task, spec, rid, run_dir, device, amp_dtype, progress, on_step):
        self.task, self.spec, self.rid, self.run_dir = task, spec, rid, run_dir
        self.t = spec["train"]
        self.device, self.amp_dtype, self.progress, self.on_step = device, amp_dtype, progress, on_step
        self.ckpt_path = run_dir / CHECKPOINT
        self.metrics_path = run_dir / "metrics.jsonl"
        # data parallel: every rank trains and evaluates the same way, only rank 0 writes the record
        self.rank, self.world = data_parallel()
        self.writer = self.rank == 0
        self.trackers = None  # train.log_to's writers (moebench.training.trackers), opened by run()

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        t, seed = self.t, self.spec["seed"]
        if t["batch_size"] % self.world:
            raise ValueError(
                f"train.batch_size={t['batch_size']} is the global batch and must divide evenly over "
                f"the {self.world} data-parallel processes; choose a multiple of {self.world}"
            )
        seed_everything(seed)
        self.train_ds, self.eval_ds = self.task.datasets()
        seed_everything(seed)  # model init must not depend on how much RNG the data build used
        model_cfg = {**dict(getattr(self.task, "default_model", {}) or {}), **self.spec["model"]}
        self.model_cfg = model_cfg
        self.model = self.task.build_model(model_cfg, self.spec["moe"]).to(self.device)
        self.layers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, MoELayer)]
        if t["compile"]:
            compile_blocks(self.model)
        self.opt = torch.optim.AdamW(param_groups(self.model, t["weight_decay"], t["lr"]), lr=t["lr"])
        steps, warmup = t["steps"], t["warmup_steps"]
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, steps, warmup))
        collate = self.task.collate_fn()
        self.collate = collate
        pin = self.device.type == "cuda"
        self.eval_loader = DataLoader(
            self.eval_ds,
            batch_size=t["eval_batch_size"],
            shuffle=False,
            num_workers=t["num_workers"],
            collate_fn=collate,
            pin_memory=pin,
        )
        self.probe_size = min(t["probe_size"], len(self.eval_ds))
        self.probe_loader = DataLoader(
            Subset(self.eval_ds, range(self.probe_size)),
            batch_size=t["eval_batch_size"],
            shuffle=False,
            num_workers=0,
            collate_fn=collate,
        )
        self.probe_every = t["probe_every"] if t["probe_every"] is not None else max(1, t["steps"] // 10)
        # state that a checkpoint carries
        self.step = 0
        self.probe_history: list[dict[str, np.ndarray]] = []
        self.probe_steps: list[int] = []
        self.init_shares: dict[str, float | None] = {}  # per layer: first_choice_max_share at step 0
        self.interval = {"loss_sum": 0.0, "aux_sum": 0.0, "n": 0}
        self.elapsed = 0.0
        self.train_time = 0.0
        self.samples_seen = 0
        self.tokens_seen = 0.0
        self.tokens_per_sample: float | None = None
        self.peak_mb = 0.0
        self.last_eval: dict | None = None
        self.grad_probes: list[dict] = []  # gradient purity at probe steps (moebench.training.gradprobe)

    def state(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "run_id": self.rid,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": _rng_state(),
            "probe_history": [{k: torch.from_numpy(v) for k, v in h.items()} for h in self.probe_history],
            "probe_steps": list(self.probe_steps),
            "init_shares": dict(self.init_shares),
            "interval": dict(self.interval),
            "elapsed_s": self.elapsed + (time.perf_counter() - self.t0),
            "train_time_s": self.train_time,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "tokens_per_sample": self.tokens_per_sample,
            "peak_memory_mb": max(self.peak_mb, peak_memory_mb(self.device)),
            "last_eval": _plain(self.last_eval),
            "grad_probes": _plain(self.grad_probes),
        }

    def save(self) -> None:
        if not self.writer:
            return
        state = self.state()
        atomic_write(self.ckpt_path, lambda f: torch.save(state, f))

    def load(self) -> bool:
        """Resume from checkpoint.pt when there is one; otherwise start clean (dropping old metrics).
        The checkpoint is untrusted input (anyone who can write to a shared results folder can plant
        one), so it loads with ``weights_only=True``: tensors and plain containers, never code. One that
        cannot be read, or belongs to another run, is set aside under ``.stale/`` and the run restarts
        from step 0, saying why in the job log and in status.json's ``note``. Only the writer (rank 0)
        touches the folder."""
        if self.writer:
            remove_temp_files(self.run_dir)  # left by a write that was killed; we own the folder now
        if not self.ckpt_path.exists() and not self.ckpt_path.is_symlink():
            if (self.metrics_path.exists() or self.metrics_path.is_symlink()) and self.writer:
                self.metrics_path.unlink()
            return False
        try:
            if self.ckpt_path.is_symlink():
                raise ValueError("it is a symbolic link")
            ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION or ck.get("run_id") != self.rid:
                got = ck.get("run_id") if isinstance(ck, dict) else None
                version = ck.get("version") if isinstance(ck, dict) else None
                raise ValueError(f"it belongs to run {got!r} (checkpoint version {version}), not {self.rid!r}")
            self._restore(ck)
        except Exception as err:  # noqa: BLE001 - whatever is wrong with it, it is not resumable
            first = (str(err).strip().splitlines() or [""])[0][:300]  # torch's weights_only errors run long
            self.restart_from_zero(f"{self.ckpt_path.name} cannot be resumed ({type(err).__name__}: {first})")
            return False
        if self.writer:
            _truncate_metrics(self.metrics_path, self.step)
        return True

    def restart_from_zero(self, why: str) -> None:
        """Set the checkpoint and metrics aside, rebuild the start state, and log why."""
        dest = set_aside(self.run_dir, [CHECKPOINT, "metrics.jsonl"]) if self.writer else None
        note = f"{why}; set aside to {dest} and restarted from step 0"
        print(f"moebench: run {self.rid}: {note}", file=sys.stderr, flush=True)
        if self.writer and (self.run_dir / "status.json").exists():
            status = read_status_safe(self.run_dir) or {}
            if status.get("state") in STATES:
                write_status(self.run_dir, status["state"], status.get("reason"), note=note)
        self.setup()  # a half-applied state_dict must not leak into the fresh start

    def _restore(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        _set_rng_state(ck["rng"])
        self.step = int(ck["step"])
        self.probe_history = [{k: v.numpy() for k, v in h.items()} for h in ck["probe_history"]]
        self.probe_steps = list(ck["probe_steps"])
        self.init_shares = dict(ck.get("init_shares") or {})
        self.interval = dict(ck["interval"])
        self.elapsed = float(ck["elapsed_s"])
        self.train_time = float(ck["train_time_s"])
        self.samples_seen = int(ck["samples_seen"])
        self.tokens_seen = float(ck["tokens_seen"])
        self.tokens_per_sample = ck["tokens_per_sample"]
        self.peak_mb = float(ck["peak_memory_mb"])
        self.last_eval = ck["last_eval"]
        self.grad_probes = list(ck.get("grad_probes") or [])

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        # Evaluation runs eager even with train.compile: it is a small share of a run, and the routing
        # statistics' hooks would make every evaluation recompile the blocks.
        with force_eager() if self.t["compile"] else contextlib.nullcontext():
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict:
        model, task = self.model, self.task
        model.eval()
        try:
            with self.autocast():
                metrics = task.evaluate(model, self.eval_loader, self.device)
                routing: dict = {"mean": {}, "per_layer": []}
                if self.layers:
                    acc = M.RoutingStatsAccumulator(model, task)
                    with acc:
                        for batch in self.eval_loader:
                            task.forward(model, to_device(batch, self.device))
                            acc.update(batch)
                    per_layer = acc.per_layer()
                    self._probe()
                    for d in per_layer:
                        d["switch_rate"] = self._last_switch(d["layer"])
                    if self.step == 0:
                        self.init_shares = {d["layer"]: d["first_choice_max_share"] for d in per_layer}
                    routing = {"mean": M.mean_over_layers(per_layer), "per_layer": per_layer}
        finally:
            model.train()
        if task.headline not in metrics:
            raise KeyError(
                f"task {type(task).__name__}.evaluate() returned {sorted(metrics)} without its headline "
                f"metric {task.headline!r}; return it or fix the task's `headline`"
            )
        items = metrics.pop("items", None)
        if items and self.writer:
            write_eval_items(self.run_dir / EVAL_ITEMS_FILE, items)
        metrics = {k: float(v) for k, v in metrics.items()}
        since = self.last_eval["step"] if self.last_eval else -1
        probes = [g for g in self.grad_probes if since < g["step"] <= self.step]
        if probes and probes[-1]["step"] == self.step:
            routing["mean"]["grad_cos_task_balance"] = probes[-1]["grad_cos_task_balance"]
        n = self.interval["n"]
        line = {
            "step": self.step,
            "train_loss": self.interval["loss_sum"] / n if n else None,
            "aux_loss": self.interval["aux_sum"] / n if n else None,
            "lr": self.opt.param_groups[0]["lr"] if self.step == 0 else self.last_lr,
            "metrics": metrics,
            "routing": {
                "mean": routing["mean"],
                "per_layer": [
                    {k: v for k, v in d.items() if k not in ("label_by_expert", "label_unrouted", "labels")}
                    for d in routing["per_layer"]
                ],
            },
            "elapsed_s": self.elapsed + (time.perf_counter() - self.t0),
            **({"grad_probe": probes} if probes else {}),
        }
        if self.writer:
            append_jsonl(self.metrics_path, line)
        if self.trackers is not None:
            self.trackers.log(line)
        self.interval = {"loss_sum": 0.0, "aux_sum": 0.0, "n": 0}
        self.last_eval = _plain({"step": self.step, "metrics": metrics, "routing": routing})
        return line

    def probe(self) -> None:
        """Route the probe samples alone (eval mode, no task metrics) and record their top-1 experts."""
        with force_eager() if self.t["compile"] else contextlib.nullcontext():
            self.model.eval()
            try:
                self._probe()
            finally:
                self.model.train()

    @torch.no_grad()
    def _probe(self) -> None:
        if not self.probe_size or not self.layers or (self.probe_steps and self.probe_steps[-1] == self.step):
            return
        # a probe must not change the run: DataLoader iterators draw a seed from the global RNG
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.autocast():
            acc = M.RoutingStatsAccumulator(self.model, self.task, keep_top1=self.probe_size)
            with acc:
                for batch in self.probe_loader:
                    self.task.forward(self.model, to_device(batch, self.device))
                    acc.update(batch)
        self.probe_history.append(acc.top1())
        self.probe_steps.append(self.step)

    def _last_switch(self, layer: str) -> float | None:
        """Switch rate of ``layer`` between the last two probe points (None before the second)."""
        if len(self.probe_history) < 2:
            return None
        prev, cur = self.probe_history[-2].get(layer), self.probe_history[-1].get(layer)
        if prev is None or cur is None or prev.size != cur.size:
            return None
        return M.switch_rate(prev, cur)

    # -- training ----------------------------------------------------------------------------------
    def run(self) -> dict:
        self.t0 = time.perf_counter()
        if self.progress is not False:
            print(f"moebench: run {self.rid}: setting up (data, model) in {self.run_dir}", file=sys.stderr, flush=True)
        self.setup()
        if self.load():  # say so in the job log and status.json: a requeued job continues, it does not restart
            attempt = (read_status_safe(self.run_dir) or {}).get("attempts")
            print(
                f"moebench: run {self.rid} resumed from step {self.step} of {self.t['steps']}"
                + (f" (attempt {attempt})" if attempt else ""),
                file=sys.stderr,
                flush=True,
            )
            if self.writer and (self.run_dir / "status.json").exists():
                write_status(self.run_dir, "running", None, resumed_from=self.step)
        self.trackers = Trackers(
            self.t["log_to"], self.run_dir, self.rid, self.spec, enabled=self.writer, start_step=self.step
        )
        self.t0 = time.perf_counter()  # after the trackers' set-up, like the data's and the model's
        try:
            return self._run()
        finally:
            self.trackers.close()

    def _run(self) -> dict:
        steps = self.t["steps"]
        self.last_lr = self.opt.param_groups[0]["lr"]
        self._token_counter = _TokenCounter(self.model) if self.tokens_per_sample is None else None
        self.last_headline = ""
        bar = None
        if self.progress is not False:
            bar = Progress(steps, self.rid, initial=self.step, tty=True if self.progress else None, unit="step")
        batches = self._batches()
        self.model.train()
        if self.step == 0 and (self.layers or self.t.get("eval_at_start")):
            self.evaluate()  # the routing before any learning: first_choice_max_share_init, moved_from_init
        try:
            while self.step < steps:
                self._train_step(batches, bar)
        except Diverged as err:
            return self._diverged(str(err))
        finally:
            if bar is not None:
                bar.close("finished" if self.step >= steps else "stopped")
            if self._token_counter is not None:
                self._token_counter.close()
            batches.close()
        return self._finish()

    def _batches(self) -> Generator:
        """The training batches from the current step on (`train_batches`)."""
        t = self.t
        return train_batches(
            self.train_ds,
            t["batch_size"],
            self.spec["seed"],
            self.step,
            t["num_workers"],
            self.collate,
            self.device.type == "cuda",
            self.rank,
            self.world,
        )

    def _train_step(self, batches: Iterator, bar: Progress | None) -> None:
        """One optimiser step: forward, divergence check, backward and update, bookkeeping, then what
        the step is due for (probe, evaluation, checkpoint, progress, a requested stop)."""
        tic = time.perf_counter()
        batch = to_device(next(batches), self.device, non_blocking=True)
        bs = self.task.batch_size(batch)
        task_loss, loss, losses = self._forward(batch, bs)
        loss_value = float(losses.sum())
        step = self.step + 1
        self._check_loss(loss_value, step)
        self._optimise(task_loss, loss, step)
        self.step = step
        self.train_time += time.perf_counter() - tic
        counter = self._token_counter
        if counter is not None and counter.per_sample is not None:
            self.tokens_per_sample, self._token_counter = counter.per_sample, None
        self.samples_seen += bs * self.world
        self.tokens_seen += bs * self.world * (self.tokens_per_sample or 1.0)
        self.interval["loss_sum"] += float(losses[0])
        self.interval["aux_sum"] += float(losses[1])
        self.interval["n"] += 1
        self._after_step(step, loss_value, bar)

    def _forward(self, batch, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Task loss, total loss (task + routers' aux) and the detached pair averaged over ranks."""
        counter = self._token_counter
        if counter is not None:
            counter.batch_size = bs
        # the token counter's one-off hook would break the compiled graph: that step runs eager
        first = force_eager() if counter is not None and self.t["compile"] else None
        with self.autocast(), first or contextlib.nullcontext():
            outputs = self.task.forward(self.model, batch)
            task_loss = self.task.loss(outputs, batch).float()
        aux = sum((m.aux_loss.float() for _, m in self.layers), torch.zeros((), device=self.device))
        loss = task_loss + aux
        losses = torch.stack([task_loss.detach(), aux.detach()])
        if self.world > 1:  # the global batch's mean, the same on every rank (so is a divergence)
            torch.distributed.all_reduce(losses)
            losses /= self.world
        return task_loss, loss, losses

    def _check_loss(self, loss_value: float, step: int) -> None:
        """Raise Diverged on a non-finite loss or one above train.max_loss."""
        max_loss = self.t["max_loss"]
        if not math.isfinite(loss_value) or (max_loss is not None and loss_value > max_loss):
            what = f"loss={loss_value:.6g}" if math.isfinite(loss_value) else f"loss={loss_value}"
            limit = f" > max_loss={max_loss:g}" if math.isfinite(loss_value) else ""
            raise Diverged(f"diverged at step {step}: {what}{limit}")

    def _optimise(self, task_loss: torch.Tensor, loss: torch.Tensor, step: int) -> None:
        """Gradient probe when due, backward, gradient averaging and clipping, optimiser and schedule
        steps, the routers' per-step updates."""
        t = self.t
        if self.layers and probe_due(step, t["steps"], t["eval_every"], t.get("probe_every")):
            probe = grad_cosine(task_loss, self.layers)
            if probe is not None:
                self.grad_probes.append({"step": step, **probe})
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            average_gradients(self.model, self.world)
        if t["grad_clip"] and t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t["grad_clip"])
        self.last_lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        for _, m in self.layers:
            m.after_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _after_step(self, step: int, loss_value: float, bar: Progress | None) -> None:
        """Probe, evaluate, checkpoint and report as the step is due; stop (checkpointed) on a signal."""
        steps, eval_every, ckpt_every = self.t["steps"], self.t["eval_every"], self.t["checkpoint_every"]
        is_eval = step == steps or (eval_every > 0 and step % eval_every == 0)
        if not is_eval and self.probe_every > 0 and step % self.probe_every == 0:
            self.probe()
        if is_eval:
            line = self.evaluate()
            if bar is not None:
                self.last_headline = f"{self.task.headline} {line['metrics'][self.task.headline]:.4g}"
        if is_eval or (ckpt_every > 0 and step % ckpt_every == 0):
            self.save()
        if bar is not None:
            if step % 10 == 0 or step == steps or is_eval:
                bar.note(f"loss {loss_value:.4f}" + (f", {self.last_headline}" if self.last_headline else ""))
            bar.update(1)
        if self.on_step is not None:
            self.on_step(step)
        if STOP_REQUESTED.is_set() and step < steps:
            self.save()
            why = f"stopped by a signal at step {step} of {steps}; checkpointed, a rerun resumes it"
            print(f"moebench: run {self.rid} {why}", file=sys.stderr, flush=True)
            raise Stopped(why)

    def _diverged(self, reason: str) -> dict:
        """Record a divergence (status.json; the checkpoint goes unless kept) and return the failed record."""
        if self.writer:
            write_status(self.run_dir, "failed", reason)
        if self.writer and not self.t["keep_checkpoint"] and self.ckpt_path.exists():
            self.ckpt_path.unlink()
        return {"state": "failed", "reason": reason, "run_id": self.rid, "step": self.step + 1}

    def _finish(self) -> dict:
        """The final record after the last step (evaluating first if that step has none), written out."""
        if self.last_eval is None or self.last_eval["step"] != self.step:
            self.evaluate()  # resumed exactly at the end without a recorded evaluation
        final = self.final_record()
        if not self.writer:
            return final
        if self.probe_history:
            write_probe_top1(self.run_dir / PROBE_TOP1_FILE, self.probe_history[-1])
        atomic_write_json(self.run_dir / "final.json", final)
        if not self.t["keep_checkpoint"] and self.ckpt_path.exists():
            self.ckpt_path.unlink()
        return final

    @torch.no_grad()
    def interventions(self) -> dict:
        """Expert ablation, drop-top-1 and the capacity sweep (moebench.training.interventions)."""
        from moebench.training.interventions import measure

        def headline() -> float:
            self.model.eval()
            try:
                with self.autocast():
                    return float(self.task.evaluate(self.model, self.eval_loader, self.device)[self.task.headline])
            finally:
                self.model.train()

        return measure(self.layers, headline, bool(self.task.higher_is_better))

    def final_record(self) -> dict:
        spec, task = self.spec, self.task
        assert self.last_eval is not None  # run() evaluates the last step before the final record
        metrics = self.last_eval["metrics"]
        moe = spec["moe"]
        return {
            "run_id": self.rid,
            "grid": spec["grid"],
            "task": spec["task"],
            "router": "dense" if moe is None else moe["router"],
            "label": spec["label"],
            "seed": spec["seed"],
            "sweep": spec["sweep"],
            "match": spec["match"],
            "model": self.model_cfg,
            "steps": self.step,
            "headline": {
                "name": task.headline,
                "value": metrics[task.headline],
                "higher_is_better": bool(task.higher_is_better),
                "margin": getattr(task, "margin", None),
                "margin_reason": getattr(task, "margin_reason", ""),
            },
            "metrics": metrics,
            "routing": self._routing_record(),
            "cost": self._cost_record(),
            "env": self._env_record(),
            **({"interventions": self.interventions()} if spec["train"].get("interventions") and self.layers else {}),
        }

    def _per_layer_record(self) -> list[dict]:
        """The last evaluation's per-layer routing with the probe history's stability measures added."""
        assert self.last_eval is not None  # as in final_record
        per_layer = [dict(d) for d in self.last_eval["routing"]["per_layer"]]
        for d in per_layer:
            hist = [h[d["layer"]] for h in self.probe_history if d["layer"] in h]
            if hist and len(hist) == len(self.probe_steps) and all(h.size == hist[-1].size for h in hist):
                d["final_switch"] = M.final_switch(hist)
                d["final_switch_mean"] = float(np.mean(d["final_switch"][:-1])) if len(hist) > 1 else None
                d["settle_fraction"] = M.settle_fraction(hist, self.probe_steps, self.spec["train"]["steps"])
                d["overlap_with_final"] = M.overlap_with_final(hist)
                d["last_fluctuation_step"] = M.last_fluctuation_step(hist, self.probe_steps)
                d["probe_switch"] = [None] + [M.switch_rate(a, b) for a, b in zip(hist[:-1], hist[1:])]
                d["moved_from_init"] = M.moved_from_init(hist[0], hist[-1]) if self.probe_steps[0] == 0 else None
            d["first_choice_max_share_init"] = self.init_shares.get(d["layer"])
        return per_layer

    def _routing_record(self) -> dict:
        """The final record's ``routing``: per layer, their mean, the switch curves, gradient purity."""
        per_layer = self._per_layer_record()
        curves = [d["final_switch"] for d in per_layer if "final_switch" in d]
        per_eval = [float(np.mean(col)) for col in zip(*curves)] if curves else []
        switches = [d["probe_switch"] for d in per_layer if "probe_switch" in d]
        per_probe = [None if None in col else float(np.mean(col)) for col in zip(*switches)] if switches else []
        routing: dict = {
            "mean": M.mean_over_layers(per_layer),
            "per_layer": per_layer,
            "recovery_by_role": M.mean_recovery_by_role(per_layer),
            # StableMoE's curve averaged over layers; `mean` excludes the last evaluation (0 by definition)
            "final_switch": {
                "steps": list(self.probe_steps),
                "per_eval": per_eval,
                "mean": float(np.mean(per_eval[:-1])) if len(per_eval) > 1 else None,
            },
            # the probe points: switch rate since the previous one, averaged over layers (the stability plot)
            "probe": {"steps": list(self.probe_steps), "switch_rate": per_probe},
        }
        if self.grad_probes:  # gradient purity: the mean over probe steps, and every probe
            routing["mean"]["grad_cos_task_balance"] = mean_cos(self.grad_probes)
            routing["grad_probe"] = _plain(self.grad_probes)
        return routing

    def _cost_record(self) -> dict:
        """The model's cost (parameters, FLOPs) and the run's time, throughput and memory."""
        cost = model_cost(self.model)
        elapsed = self.elapsed + (time.perf_counter() - self.t0)
        cost.update(
            {
                "wall_time_s": elapsed,
                "train_time_s": self.train_time,
                "ms_per_step": 1000.0 * self.train_time / self.step if self.step else None,
                "tokens_per_s": self.tokens_seen / self.train_time if self.train_time > 0 else None,
                "samples_per_s": self.samples_seen / self.train_time if self.train_time > 0 else None,
                "tokens_per_sample": self.tokens_per_sample,
                "peak_memory_mb": max(self.peak_mb, peak_memory_mb(self.device)),
            }
        )
        return cost

    def _env_record(self) -> dict:
        env = environment_info()
        env.update(
            {
                "train_device": str(self.device),
                "amp": None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", ""),
            }
        )
        return env
