"""Checkpoints and ``--resume``: the journal makes both cheap.

Every CLI run journals its steps (``<run>/journal.zoj``, a few hundred bytes a step) and saves
a checkpoint every ``checkpoint_every`` steps or ``checkpoint_minutes`` minutes (weights of the
trained tensors, optimizer state, loss curve). ``--resume`` loads the last complete checkpoint,
replays the journal records after it without a forward pass (``zoengine.journal``) and goes
on, so a run killed at any moment ends with the weights of an uninterrupted run, bit for bit
on the CPU backends; the batches need no replay because each step's batch is a pure function of
(seed, step) (``zoengine.run.loop.step_rng``).
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import asdict, fields

import torch

from zoengine.journal import JournalError, apply_record, read_records, tensors_hash
from zoengine.run.config import RunConfig
from zoengine.run.controls import BEST_PREFIX
from zoengine.run.loop import Progress


class ResumeError(ValueError):
    """A run folder cannot be resumed as asked; ``flag`` names the option to fix."""

    def __init__(self, message: str, flag: str = "--resume"):
        super().__init__(message)
        self.flag = flag


class Checkpointer:
    """The loop's ``on_step`` hook: a checkpoint every ``every`` steps or ``minutes`` minutes
    (whichever comes first; 0 disables that trigger)."""

    def __init__(self, folder, strategy, opt, *, every: int, minutes: float,
                 after_dev: bool = False):
        self.folder, self.strategy, self.opt = folder, strategy, opt
        self.every, self.seconds, self.after_dev = every, minutes * 60.0, after_dev
        self.last = time.monotonic()

    def __call__(self, p: Progress) -> None:
        due = (self.every and p.step % self.every == 0) or (
            self.seconds and time.monotonic() - self.last >= self.seconds) or (
            self.after_dev and p.dev and p.dev[-1]["step"] == p.step)  # --keep-best
        if due:
            self.save(p)

    def save(self, p: Progress) -> None:
        self.opt.sync_journal()  # the checkpoint must never be ahead of a durable journal
        tensors = {n: t.detach().clone() for n, t in self.strategy.named_params()}
        if p.best is not None and p.best["step"] != p.step:  # --keep-best: its tensors too
            tensors.update({BEST_PREFIX + n: t for n, t in p.best_tensors.items()})
        self.folder.save_checkpoint(p.step, tensors, self.opt.state_dict(),
                                    {"loss": p.loss, "dev": p.dev, "forwards": p.forwards,
                                     "best": p.best}, journal_records=p.step)
        self.last = time.monotonic()


def restore(folder, strategy, opt, dev0: dict, *, log=print) -> Progress:
    """Bring ``opt`` and the strategy's tensors to where the run in ``folder`` stopped: its last
    checkpoint, then the journal records after it. Returns the loop's progress."""
    ck = folder.load_checkpoint()
    if ck is None:
        p = Progress(dev=[dev0])
    else:
        step, tensors, opt_state, extra = ck
        named = dict(strategy.named_params())
        best = {n[len(BEST_PREFIX):]: tensors.pop(n) for n in list(tensors)
                if n.startswith(BEST_PREFIX)}
        if set(named) != set(tensors):
            raise ResumeError(f"{folder.path}: the checkpoint holds tensors "
                              f"{sorted(tensors)[:3]}..., this run trains {sorted(named)[:3]}...:"
                              " a different --train, model or LoRA setting")
        with torch.no_grad():
            for name, t in tensors.items():
                named[name].copy_(t)
        try:
            opt.load_state_dict(opt_state)
        except ValueError as exc:
            raise ResumeError(f"{folder.path}: the optimizer configuration differs: {exc}",
                              "--method") from None
        p = Progress(step=step, loss=list(extra["loss"]), dev=list(extra["dev"]),
                     forwards=int(extra.get("forwards", 0)), best=extra.get("best"))
        if p.best is not None:  # --keep-best: the best step's tensors (this step's if absent)
            p.best_tensors = best or {n: t.detach().clone() for n, t in named.items()}
    return replay_journal(folder.journal_path, opt, p, log=log)


def replay_journal(path, opt, p: Progress, *, log=print) -> Progress:
    """Apply the journal's records from step ``p.step`` on (no forward pass)."""
    try:
        header, records, torn = read_records(path)
    except FileNotFoundError:
        return p
    todo = [r for r in records if r.step >= p.step]
    t0 = time.perf_counter()
    with torch.no_grad():
        for r in todo:
            apply_record(opt, r, path=str(path))
            p.step += 1
            p.forwards += len(r.values)  # the step's loss evaluations, as the loop counts them
            # as the loop records it: the step's loss as fp32, rounded
            loss = float(torch.tensor(r.step_loss(header["n_samples"]), dtype=torch.float32))
            p.loss.append(round(loss, 6))
    if todo or torn:
        log(f"resume: replayed {len(todo)} journal steps in {time.perf_counter() - t0:.2f} s "
            f"(no forward pass){'; dropped a torn last record' if torn else ''}")
    return p


def check_base(header_path, named_params) -> None:
    """Refuse to resume on other starting weights than the run's (the journal's base hash)."""
    try:
        from zoengine.journal import read_header

        header, _ = read_header(header_path)
    except FileNotFoundError:
        return
    except JournalError as exc:
        raise ResumeError(str(exc)) from None
    base = header.get("base_sha256")
    if base and header.get("start_step", 0) == 0 and tensors_hash(named_params) != base:
        raise ResumeError(f"{header_path}: the trained tensors start from other weights than "
                          "the run's (SHA-256 of the base differs): a different --model?",
                          "--model")


def journal_steps(path) -> int | None:
    """Steps the journal at ``path`` holds: 0 when it is absent, empty, holds only its header
    or a header whose write never finished (a kill or a full disk while it was written);
    None when it cannot be read (damaged)."""
    from zoengine.optim.journal_file import MAGIC

    try:
        _, records, _ = read_records(path)
    except FileNotFoundError:
        return 0
    except JournalError:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4:
            return 0 if MAGIC.startswith(head[:len(MAGIC)]) else None
        if not head.startswith(MAGIC):
            return None
        (n,) = struct.unpack("<I", head[len(MAGIC):])
        return 0 if os.path.getsize(path) < len(MAGIC) + 8 + n else None
    return records[-1].step + 1 if records else 0


def steps_done(run_dir: str) -> int:
    """Steps the run in ``run_dir`` has committed: its checkpoint's, or its journal's."""
    from zoengine.storage.manifest import read_manifest

    ck = (read_manifest(run_dir) or {}).get("checkpoint") or {}
    return max(int(ck.get("step", 0)), journal_steps(os.path.join(run_dir, "journal.zoj")) or 0)


# flags that may differ on --resume: they change how, not what, the run computes (--steps may
# grow, or shrink down to the steps done). --threads is not among them: another thread count
# gives other losses (a forward's summation order), so the resumed run would not be exact.
RESUME_FREE = ("steps", "progress", "checkpoint_every", "checkpoint_minutes", "journal_fsync")


def _flag(name: str) -> str:
    from zoengine.run.config import flag_of

    return flag_of({f.name: f for f in fields(RunConfig)}[name])


def given_values(given) -> dict:
    """The values the user passed beside ``--resume`` (flags and ``--config`` keys): those a
    ``RunConfig`` from ``make_run_config`` records in ``given_flags``; for another
    ``RunConfig``, the fields that differ from the defaults; a dict is taken as is."""
    if isinstance(given, dict):
        return dict(given)
    names = getattr(given, "given_flags", None)
    values = asdict(given)
    if names is not None:
        return {n: values[n] for n in names}
    defaults = asdict(RunConfig.unvalidated())
    return {n: v for n, v in values.items() if v != defaults[n]}


def resume_config(run_dir: str, given) -> RunConfig:
    """The configuration saved in ``run_dir/run.json`` (verified against the manifest), with
    the flags the user passed on the ``--resume`` command line: those in ``RESUME_FREE`` are
    taken, any other that differs from the run's recorded value is refused naming the flag,
    the run's value and the passed one; ``--steps`` below the steps done is refused. A
    ``run.json`` key that ``RunConfig`` does not know (renamed, retired, misspelt) is refused;
    a missing key (a ``run.json`` of an older zoengine) takes its default."""
    from zoengine.storage.folder import RunFolder

    got = (RunFolder(run_dir).read_run_config(flag="--resume")
           if os.path.isdir(run_dir) else None)
    if got is None:
        raise ResumeError(f"{run_dir!r} holds no zoengine run (no run.json)")
    path = os.path.join(run_dir, "run.json")
    try:
        saved = json.loads(got[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path}: unreadable ({exc})") from None
    if not isinstance(saved, dict):
        raise ResumeError(f"{path}: not a mapping of option: value")
    known = [f.name for f in fields(RunConfig)]
    unknown = sorted(set(saved) - set(known))
    if unknown:
        raise ResumeError(f"{path}: unknown keys {unknown} (renamed, retired or misspelt?): "
                          "a resumed run keeps its whole configuration, and dropping them "
                          f"would change it; known keys: {', '.join(known)}")
    cfg = RunConfig(**saved)
    for name, value in given_values(given).items():
        ran = getattr(cfg, name)
        if value == ran or value is None:
            continue
        flag = _flag(name)
        if name == "output_dir":
            if os.path.realpath(str(value)) == os.path.realpath(run_dir):
                continue
            raise ResumeError(f"{flag} {value!r} differs from --resume {run_dir!r}: a resumed "
                              "run writes into its own folder", flag)
        if name == "threads" and ran is None:  # a run.json from before threads were recorded
            setattr(cfg, name, value)
            continue
        if name not in RESUME_FREE:
            why = (": another thread count changes the losses (a forward's summation order), "
                   "so the resumed run would not be bit-identical" if name == "threads"
                   else ": a resumed run keeps its configuration")
            raise ResumeError(f"{flag} {value!r} differs from the run's {ran!r}{why}; allowed: "
                              f"{ran!r} or no {flag}", flag)
        setattr(cfg, name, value)
    cfg.output_dir = run_dir
    cfg.validate()
    done = steps_done(run_dir)
    if cfg.steps is not None and cfg.steps < done:
        raise ResumeError(f"--steps {cfg.steps} is lower than the {done} steps the run in "
                          f"{run_dir} has done; allowed: --steps >= {done}", "--steps")
    return cfg
