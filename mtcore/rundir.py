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
# What to do about a damaged run file, whatever the damage (empty, cut short, not JSON/TOML, not mtcore's).
STATE_ADVICE = "restore it, or delete it to run every stage again"
SPLITS_ADVICE = "restore it, or start the run in another --out"
CONFIG_ADVICE = "restore it, or start the run in another --out"


def read_run_file(path: Path, read, advice: str):
    """read(path), with every way the file can be damaged (empty, cut short, not UTF-8, not JSON or
    TOML) one error that says what to do."""
    try:
        if path.stat().st_size == 0:
            raise MtcoreError(f"{path}: empty")
        return read(path)
    except OSError as e:
        raise MtcoreError(f"{path}: cannot read ({e.strerror or e})") from None
    except MtcoreError as e:
        raise MtcoreError(f"{e}; {path.name} is damaged: {advice}") from None


def read_state(path: Path) -> dict:
    """state.json: the stages done, where the run stopped, a stage that failed. A file mtcore did not
    write is a one-line error saying what to do."""
    if not path.exists():
        return {"done": [], "stopped_at": None, "failed": None}
    state = read_run_file(path, read_json, STATE_ADVICE)
    ok = (isinstance(state, dict) and isinstance(state.get("done"), list)
          and all(isinstance(k, str) for k in state["done"])
          and (state.get("stopped_at") is None or type(state.get("stopped_at")) is int)
          and (state.get("failed") is None or (isinstance(state["failed"], str) and state["failed"].count("/") == 1
                                               and state["failed"].rsplit("/", 1)[1] in RETRY_KEYS)))
    if not ok:
        raise MtcoreError(f"{path}: not a run state that mtcore wrote; {STATE_ADVICE}")
    state.setdefault("failed", None)
    return state


def read_splits(path: Path, iters: int) -> dict:
    splits = read_run_file(path, read_json, SPLITS_ADVICE)
    names = ["selection", "rm"] + [f"policy_{t}" for t in range(1, iters + 1)]
    if not isinstance(splits, dict) or not all(isinstance(splits.get(k), list) and splits[k] for k in names):
        raise MtcoreError(f"{path}: not the prompt splits that mtcore wrote for {iters} iterations; {SPLITS_ADVICE}")
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

    def __init__(self, out, cfg: LoopConfig, world: World | None = None, redo: str | None = None):
        self.dir, self.cfg, self.world, self.redo = Path(out), cfg, world, redo
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
            self._check_same_config(read_run_file(config_file, read_config_file, CONFIG_ADVICE))
        elif self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise MtcoreError(f"{self.dir}: exists, is not an empty directory and holds no mtcore run; "
                              f"use another --out")
        elif self.redo:
            raise MtcoreError(f"--redo {self.redo}: {self.dir} holds no run yet; leave --redo out to start it")
        if self.redo and parallel.is_main():  # the other ranks read the state rank 0 wrote
            self._redo(self.redo)
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
        else:
            self._check_models()

    def _check_same_config(self, saved: dict) -> None:
        """The run directory's config must be this one, except the runtime keys, and the training keys
        of a stage that stopped at a NaN/inf loss (a rerun with a lower learning rate goes on from it)."""
        mine = identity(self.cfg)
        failed = self.state.get("failed")
        retry = RETRY_KEYS[failed.rsplit("/", 1)[1]] if failed else ()
        diff = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
        lacks = [k for k in diff if k not in saved]
        if lacks and not [k for k in diff if k in saved and k not in retry]:  # what it holds is ours: cut short
            raise MtcoreError(f"{self.dir / 'config.toml'}: lacks {lacks[0]}"
                              + (f" and {len(lacks) - 1} more" if len(lacks) > 1 else "")
                              + f" (cut short, or written by another version of mtcore); {CONFIG_ADVICE}")
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

    def _redo(self, key: str) -> None:
        """--redo KEY: KEY and every stage done after it are marked not done (state.json lists them in
        the order they were done), so this run does them again; the stages before it are kept."""
        done = self.state["done"]
        if key not in done:
            raise MtcoreError(f"--redo {key}: not a finished stage of {self.dir} (finished: {', '.join(done) or 'none'})")
        self.state["done"] = done[:done.index(key)]
        stopped = self.state["stopped_at"]
        if stopped is not None and f"iter_{stopped}/select" not in self.state["done"]:
            self.state["stopped_at"] = None
        log.warning("%s: redoing %s and the %d stages done after it", self.dir, key, len(done) - len(self.state["done"]) - 1)
        write_json(self.dir / "state.json", self.state)

    def _models_to_check(self) -> list[tuple[Path, str, str]]:
        """(checkpoint, kind, the stage to redo when it is damaged) of every model that the stages done
        left and the run will use or report: pi_t and r_t, or the candidates that select will read."""
        models = []
        for t in range(1, self.cfg.iters + 1):
            d, dpo = self.iter_dir(t), f"iter_{t}/dpo"
            if self.is_done(f"iter_{t}/select"):  # pi_t: a candidate installed (most are pruned: redo DPO)
                models.append((d / "policy", "policy", dpo))
                if self.is_done(f"iter_{t}/rm"):
                    models.append((d / "reward", "reward", f"iter_{t}/rm"))
                elif self.cfg.m_step and self.state["stopped_at"] == t:  # r_{t-1}, installed by select
                    models.append((d / "reward", "reward", dpo))
            elif self.is_done(dpo):
                models += [(c, "policy", dpo) for c in sorted((d / "candidates").glob("step_*"))]
        return models

    def _check_models(self) -> None:
        """On resume, the base models and every model of _models_to_check, from config.json and the
        safetensors headers and file sizes alone (checkpoint.check_checkpoint): a damaged one is one
        error naming it and the stage to redo, never a model passed on."""
        for path, kind in ((self.base_policy, "policy"), (self.base_reward, "reward")):
            try:
                check_checkpoint(path, kind)
            except MtcoreError as e:
                raise MtcoreError(f"{e}; the run's base {kind} model is damaged: restore it") from None
        for path, kind, key in self._models_to_check():
            try:
                check_checkpoint(path, kind)
            except MtcoreError as e:
                raise MtcoreError(f"{e}; {path} is damaged: redo the stage that made it with `mtcore train --out "
                                  f"{self.dir} --redo {key}` and the run's other options (the stages after it "
                                  f"run again too)") from None

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
