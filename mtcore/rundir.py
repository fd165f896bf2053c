"""The run directory of `mtcore train`: its config, prompt splits and stage state, and where every
stage's outputs go. A new run's config.toml is written only after the config, the prompts and the
models have been checked; a run directory holds one run, and a rerun resumes it.

  config.toml        the run's identity (config.LoopConfig less its runtime keys)
  splits.json        the prompt splits: selection, rm, policy_1 ... policy_T (the toy world: test too)
  state.json         the stages done, where the run stopped early, a stage that failed
  iter_t/            one iteration's files: samples, pairs, candidates, policy, reward, <stage>.json

Under torchrun every rank opens the run alike; rank 0 alone writes.
"""

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mtcore import parallel, rmeval
from mtcore.checkpoint import check_checkpoint, resolve
from mtcore.config import LoopConfig, identity, read_config_file, to_toml
from mtcore.data import prompt_of, read_jsonl
from mtcore.device import default_device
from mtcore.errors import MtcoreError
from mtcore.files import read_json, write_json, write_text_atomic
from mtcore.mutual_taught import stage_seed

log = logging.getLogger(__name__)

# The training keys a rerun may change after a stage stopped at a NaN/inf loss.
RETRY_KEYS = {"dpo": ("dpo_lr", "dpo_batch_size", "dpo_epochs", "beta"), "rm": ("rm_lr", "rm_batch_size", "rm_epochs")}


def read_state(path: Path) -> dict:
    """state.json: the stages done, where the run stopped, a stage that failed. A file mtcore did not
    write is a one-line error saying what to do."""
    if not path.exists():
        return {"done": [], "stopped_at": None, "failed": None}
    state = read_json(path)
    ok = (isinstance(state, dict) and isinstance(state.get("done"), list)
          and all(isinstance(k, str) for k in state["done"])
          and (state.get("stopped_at") is None or type(state.get("stopped_at")) is int)
          and (state.get("failed") is None or (isinstance(state["failed"], str) and state["failed"].count("/") == 1
                                               and state["failed"].rsplit("/", 1)[1] in RETRY_KEYS)))
    if not ok:
        raise MtcoreError(f"{path}: not a run state that mtcore wrote; restore it, or delete it to run every "
                          f"stage again")
    state.setdefault("failed", None)
    return state


def read_splits(path: Path, iters: int) -> dict:
    splits = read_json(path)
    names = ["selection", "rm"] + [f"policy_{t}" for t in range(1, iters + 1)]
    if not isinstance(splits, dict) or not all(isinstance(splits.get(k), list) and splits[k] for k in names):
        raise MtcoreError(f"{path}: not the prompt splits that mtcore wrote for {iters} iterations; restore it, or "
                          f"start the run in another --out")
    return splits


@dataclass
class World:
    """A world whose truth is known, as the loop meets it (mtcore/toy.py's world() is one; a real
    run has none): its initial models, its prompt splits, a gold-judged evaluation of the initial
    models (t = 0) and of each iteration's, and a plot of those numbers."""
    base_policy: Path
    base_reward: Path
    make_splits: Callable[[LoopConfig], dict]  # cfg -> {"selection", "rm", "policy_1", ..., and its own}
    gold_metrics: Callable  # (run, t, meter) -> dict of numbers; t = 0: the initial models
    plot: Callable[[Path, dict], None]  # (png path, metrics.json's content)


class Run:
    """A run directory: config, prompt splits, stage state, and the paths of every stage's outputs."""

    def __init__(self, out, cfg: LoopConfig, world: World | None = None):
        self.dir, self.cfg, self.world = Path(out), cfg, world
        self.device = default_device(cfg.device)
        if (world is None) == (not cfg.policy):
            raise MtcoreError("a run needs exactly one of --policy (real models) or a world (the toy world)")
        if world is not None:
            self.base_policy, self.base_reward = world.base_policy, world.base_reward
        else:
            self.base_policy, self.base_reward = resolve(cfg.policy), resolve(cfg.reward)
        if parallel.is_main():  # creates the run directory; the other ranks then read it
            self._open()
        parallel.barrier()
        if not parallel.is_main():
            self._open()

    def _open(self):
        """Check (or, for a new run, make) the run directory. A new run's config.toml is written only
        after the config, the prompts and the models it names have been checked, so a refused value
        never locks the directory."""
        config_file, splits_file = self.dir / "config.toml", self.dir / "splits.json"
        self.state = read_state(self.dir / "state.json")
        if config_file.exists():
            self._check_same_config(read_config_file(config_file))
        elif self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise MtcoreError(f"{self.dir}: exists, is not an empty directory and holds no mtcore run; "
                              f"use another --out")
        # new splits as splits.json will hold them (sorted keys), so a resumed run reads the same bytes
        self.splits = read_splits(splits_file, self.cfg.iters) if splits_file.exists() else json.loads(
            json.dumps(self._make_splits(), sort_keys=True))
        if not config_file.exists():
            check_checkpoint(self.base_policy, "policy")
            check_checkpoint(self.base_reward, "reward")
            if self.cfg.rm_eval:
                rmeval.read_eval_pairs(self.cfg.rm_eval)
            if parallel.is_main():
                write_text_atomic(config_file, to_toml(identity(self.cfg)))
        if not splits_file.exists():
            if parallel.is_main():
                write_json(splits_file, self.splits)

    def _check_same_config(self, saved: dict) -> None:
        """The run directory's config must be this one, except the runtime keys, and the training keys
        of a stage that stopped at a NaN/inf loss (a rerun with a lower learning rate goes on from it)."""
        mine = identity(self.cfg)
        failed = self.state.get("failed")
        retry = RETRY_KEYS[failed.rsplit("/", 1)[1]] if failed else ()
        diff = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
        if [k for k in diff if k not in retry]:
            k = [k for k in diff if k not in retry][0]
            raise MtcoreError(f"{self.dir} holds a run with another config ({k} = {saved.get(k)!r} there, "
                              f"{mine.get(k)!r} now{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                              f"resume it with the same options or use another --out")
        if diff:  # the failed stage starts afresh with the new values
            log.warning("%s: %s changed after %s stopped at a non-finite loss; it restarts with them",
                        self.dir, ", ".join(diff), failed)
            stage_dir = self.dir / failed.rsplit("/", 1)[0]
            for name in ("dpo_state", "candidates", "last_good") if failed.endswith("dpo") else ("rm_state", "last_good"):
                if parallel.is_main():
                    shutil.rmtree(stage_dir / name, ignore_errors=True)
            self.state.setdefault("config_changes", []).append(
                {"at": failed, "changed": {k: [saved.get(k), mine.get(k)] for k in diff}})
            self.state["failed"] = None
            if parallel.is_main():
                write_json(self.dir / "state.json", self.state)
                write_text_atomic(self.dir / "config.toml", to_toml(mine))

    def _make_splits(self) -> dict:
        cfg = self.cfg
        if self.world is not None:
            return self.world.make_splits(cfg)
        rows = read_jsonl(cfg.prompts)
        prompts = [prompt_of(r, f"{cfg.prompts}:{r['_line']}") for r in rows]
        random.Random(cfg.seed).shuffle(prompts)
        n_fixed = cfg.selection_size + cfg.rm_split_size
        if len(prompts) < n_fixed + cfg.iters:
            raise MtcoreError(f"{cfg.prompts}: {len(prompts)} prompts, too few for a selection set of "
                              f"{cfg.selection_size}, an RM split of {cfg.rm_split_size} and {cfg.iters} policy splits")
        splits = {"selection": prompts[:cfg.selection_size], "rm": prompts[cfg.selection_size:n_fixed]}
        rest = prompts[n_fixed:]
        per = len(rest) // cfg.iters
        for k in range(cfg.iters):
            splits[f"policy_{k + 1}"] = rest[k * per:(k + 1) * per]
        return splits

    def iter_dir(self, t: int) -> Path:
        return self.dir / f"iter_{t}"

    def policy(self, t: int) -> Path:
        """pi_t: the base policy for t = 0."""
        return self.base_policy if t == 0 else self.iter_dir(t) / "policy"

    def reward(self, t: int) -> Path:
        """r_t: the base RM for t = 0, and always with the M-step off."""
        return self.base_reward if t == 0 or not self.cfg.m_step else self.iter_dir(t) / "reward"

    def is_done(self, key: str) -> bool:
        return key in self.state["done"]

    def mark_done(self, key: str) -> None:
        self.state["done"].append(key)
        if self.state.get("failed") == key:
            self.state["failed"] = None
        if parallel.is_main():
            write_json(self.dir / "state.json", self.state)

    def seed(self, t: int, stage: str) -> int:
        return stage_seed(self.cfg.seed, t, stage)
