"""The run directory of `mtcore train`: its config, prompt splits and stage state, and where every
stage's outputs go. A new run's config.toml is written only after the config, the prompts and the
models have been checked; a run directory holds one run, and a rerun resumes it.

  config.toml        the run's identity (config.LoopConfig less its runtime keys)
  splits.json        the prompt splits: selection, rm, policy_1 ... policy_T (the toy world: test too)
  prompts.sha256     the prompts' content hash and count, part of the run's identity (their path is not:
                     a renamed or moved prompts file resumes the run, other prompts at the same path do
                     not, except prompts appended to extend it)
  state.json         the stages done, where the run stopped early, a stage that failed
  iter_t/            one iteration's files: samples, pairs, candidates, policy, reward, <stage>.json

Under torchrun every rank opens the run alike; rank 0 alone writes.
"""

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mtcore import parallel, rmeval
from mtcore.checkpoint import check_checkpoint, resolve
from mtcore.config import LATER_KEYS, LoopConfig, identity, read_config_file, to_toml
from mtcore.data import Source, prompt_of, read_rows
from mtcore.device import default_device
from mtcore.errors import MtcoreError
from mtcore.files import read_json, write_json, write_text_atomic
from mtcore.mutual_taught import stage_seed

log = logging.getLogger(__name__)

# The training keys a rerun may change after a stage stopped at a NaN/inf loss.
RETRY_KEYS = {"dpo": ("dpo_lr", "dpo_batch_size", "dpo_epochs", "beta"), "rm": ("rm_lr", "rm_batch_size", "rm_epochs")}
# The keys the first stage's saved shards (iter_1/sample.shards, score.shards) depend on: a directory
# in which no stage has finished keeps them across a config change of any other key.
SHARD_KEYS = {"policy", "reward", "prompts", "prompts_split", "prompt_field", "seed", "samples", "temperature",
              "top_p", "max_new_tokens", "selection_size", "rm_split_size", "policy_split_size", "iters"}
# What to do about a damaged run file, whatever the damage (empty, cut short, not JSON/TOML, not mtcore's).
STATE_ADVICE = "restore it, or delete it to run every stage again"
SPLITS_ADVICE = "restore it, or start the run in another --out"
CONFIG_ADVICE = "restore it, or start the run in another --out"
# "<the prompts' content hash> <count> [<count> ...]": the count the run started from, then the count
# after each time prompts were appended to extend it (the order its splits are cut from), written with config.toml
PROMPTS_HASH = "prompts.sha256"


def _shown(key: str, value) -> str:
    """A config value as a refusal names it: a later key's default as "the default" (for the pairing
    rule, the M-step's own)."""
    return "the default" if key in LATER_KEYS and value == LATER_KEYS[key] else repr(value)


def prompts_sha256(prompts: list) -> str:
    """The hash of prompts as read (each prompt_of, in file order): the same for the same prompts in a
    renamed, moved, gzipped or Parquet file, other for any prompt changed, added or removed."""
    text = json.dumps(prompts, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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


def split_sizes(cfg: LoopConfig, n: int, source: str) -> dict[str, int]:
    """The sizes of the splits of n shuffled prompts, in the order they are cut: the selection set,
    the RM split, then --policy-split-size prompts for each iteration (policy_1 ... policy_T), so a
    run's first splits do not depend on --iters and a larger --iters extends it. policy_split_size 0
    splits the rest evenly over --iters instead (such a run cannot be extended). Too few prompts is
    one error naming the options and the largest sizes that fit."""
    per = cfg.policy_split_size or max(0, n - cfg.selection_size - cfg.rm_split_size) // cfg.iters
    need = cfg.selection_size + cfg.rm_split_size + cfg.iters * max(per, 1)
    if n < need:
        if n < cfg.iters + 2:
            raise MtcoreError(f"{source}: {n} prompts; a run of {cfg.iters} iterations needs at least "
                              f"{cfg.iters + 2} (one each for the selection set, the RM split and each iteration)")
        rest = n - cfg.selection_size - cfg.rm_split_size
        if rest >= cfg.iters:  # the fixed sets fit: the largest policy splits that do
            fit = f"--policy-split-size {rest // cfg.iters}"
        else:  # every size in proportion
            scale = n / need
            sizes = [max(1, int(v * scale)) for v in (cfg.selection_size, cfg.rm_split_size, max(per, 1))]
            while sizes[0] + sizes[1] + cfg.iters * sizes[2] > n:  # the rounding up to 1 took too many
                i = max(range(3), key=lambda j: sizes[j])
                sizes[i] -= 1
            fit = f"--selection-size {sizes[0]} --rm-split-size {sizes[1]} --policy-split-size {sizes[2]}"
        raise MtcoreError(f"{source}: {n} prompts, too few for a selection set of {cfg.selection_size} "
                          f"(--selection-size), an RM split of {cfg.rm_split_size} (--rm-split-size) and "
                          f"{cfg.iters} iterations (--iters) of {per} prompts (--policy-split-size): {need} in all; "
                          f"sizes that fit: {fit}")
    return {"selection": cfg.selection_size, "rm": cfg.rm_split_size,
            **{f"policy_{k}": per for k in range(1, cfg.iters + 1)}}


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
    reporter = None  # `mtcore train --report-to`'s report.Reporter, set by loop.train

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
        after the config, the prompts and the models it names have been checked (preflight.check), so
        a refused value never locks the directory; and a directory in which no stage has finished takes
        a new config (a corrected command) in place of the old one."""
        config_file, splits_file = self.dir / "config.toml", self.dir / "splits.json"
        self.state = read_state(self.dir / "state.json")
        saved = read_run_file(config_file, read_config_file, CONFIG_ADVICE) if config_file.exists() else None
        if saved is None and self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise MtcoreError(f"{self.dir}: exists, is not an empty directory and holds no mtcore run; "
                              f"use another --out")
        if self.redo and parallel.is_main() and (saved is None or not self.state["done"]):  # (the other ranks
            raise MtcoreError(f"--redo {self.redo}: {self.dir} holds no finished stage yet; leave --redo out")  # read
        mine = identity(self.cfg)  # the state rank 0's --redo left)
        saved, moved, other_prompts = self._saved_prompts(saved)
        changed = [] if saved is None else [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
        changed += ["prompts"] if other_prompts and "prompts" not in changed else []
        began = self._begun() > 0
        if other_prompts and began and not (type(saved.get("iters")) is int and self.cfg.iters > saved["iters"]
                                            and self._appended()):  # appended prompts extend a run
            self._refuse_other_prompts()
        even = self.world is None and self.cfg.policy_split_size == 0  # --iters decides every split
        replace = saved is not None and not began and (
            [k for k in changed if k != "iters" or even] or not splits_file.exists())
        if saved is None or replace:
            self._check_new_run()
            if parallel.is_main():
                if replace:
                    self._replace(changed)
                write_json(splits_file, self.splits)  # first: a config.toml always has its splits
                self._write_prompts_hash(fresh=True)
                write_text_atomic(config_file, to_toml(mine))
            return
        saved = self._check_same_config(saved)
        if parallel.is_main() and self.world is None and (moved or not (self.dir / PROMPTS_HASH).exists()):
            self._record_prompts(config_file)
        if self.redo and parallel.is_main():  # the other ranks read the state rank 0 wrote
            self._redo(self.redo)
        self.splits = self._splits_for_iters(saved, splits_file)
        self._check_models()

    def prompts_sha256(self) -> str:
        """prompts_sha256 of --prompts' prompts, computed once (a run's start asks several times)."""
        if not hasattr(self, "_prompts_digest"):
            self._prompts_digest = prompts_sha256(self._prompts())
        return self._prompts_digest

    def _saved_hash(self) -> tuple[str, list[int]]:
        """PROMPTS_HASH's (hash, counts); none where it is not written (a run made before it)."""
        path = self.dir / PROMPTS_HASH
        fields = path.read_text(encoding="utf-8").split() if path.exists() else []
        counts = [int(f) for f in fields[1:] if f.isdigit()]
        return (fields[0] if fields else ""), counts

    def _appended(self) -> bool:
        """Whether --prompts holds the run's prompts, then more (appended to its file)."""
        digest, counts = self._saved_hash()
        prompts = self._prompts()
        return bool(counts) and len(prompts) > counts[-1] and prompts_sha256(prompts[:counts[-1]]) == digest

    def _counts(self) -> list[int]:
        """The ends of the prompts' parts: the run's own counts, this file's where it appended prompts;
        [all of them] for a run on them as they are without a record (made before PROMPTS_HASH)."""
        digest, counts = self._saved_hash()
        n = len(self._prompts())
        if self._appended():
            return counts + [n]
        return counts if counts and counts[-1] == n and digest == self.prompts_sha256() else [n]

    def _prompt_order(self) -> list:
        """The prompts in the order the run's splits are cut from: shuffled by the seed, then each part
        appended to extend the run after them, shuffled alike."""
        order, start = [], 0
        for end in self._counts():
            part = list(self._prompts()[start:end])
            random.Random(self.cfg.seed).shuffle(part)
            order, start = order + part, end
        return order

    def _extended_splits(self, splits: dict, saved_iters: int) -> dict:
        """A real run's splits for a larger --iters: its own as they are, then the new iterations' from the
        prompts it has not used, in _prompt_order: policy_split_size each, or, where fewer are left, an
        even share of them (a run on 100-127 prompts extends on the same file). The advice where none is
        left for a new iteration keeps the run's own sizes, which its identity holds."""
        iters, size, order = self.cfg.iters, self.cfg.policy_split_size, self._prompt_order()
        names = ["selection", "rm"] + [f"policy_{t}" for t in range(1, saved_iters + 1)]
        rebuilt, start = {}, 0
        for name in names:
            rebuilt[name], start = order[start:start + len(splits[name])], start + len(splits[name])
        rebuilt = json.loads(json.dumps(rebuilt, sort_keys=True))
        changed = next((k for k in names if rebuilt[k] != splits[k]), None)
        if changed:
            raise MtcoreError(f"--iters {iters}: the prompts ({self.cfg.prompts}) no longer give this run's {changed} "
                              f"split; extend the run with the prompts it started from, or with more appended to them")
        left, new = order[start:], iters - saved_iters
        per = min(size, len(left) // new)
        if per == 0:
            raise MtcoreError(f"--iters {iters}: {self.cfg.prompts} has {len(left)} prompts left after this run's "
                              f"splits, fewer than one for each of the {new} new iterations; append prompts to it "
                              f"(the run keeps its splits; {size} an iteration at most), or give --iters "
                              f"{saved_iters + len(left)} or less")
        if per < size and parallel.is_main():
            log.warning("%s: %d prompts are left after the run's splits: the new policy splits take %d each "
                        "(policy_split_size %d); append prompts to %s for full ones", self.dir, len(left), per,
                        size, self.cfg.prompts)
        for k in range(new):
            rebuilt[f"policy_{saved_iters + 1 + k}"] = left[k * per:(k + 1) * per]
        return json.loads(json.dumps(rebuilt, sort_keys=True))

    def _prompts(self) -> list:
        """--prompts' prompts in file order, read once."""
        if not hasattr(self, "_prompt_list"):
            self._prompt_list = [prompt_of(r, r["_where"], self.cfg.prompt_field) for r in read_rows(self._source())]
        return self._prompt_list

    def _source(self) -> Source:
        cfg = self.cfg
        return Source(cfg.prompts, cfg.prompts_split or None, "--prompts-split", prompt=cfg.prompt_field)

    def _saved_prompts(self, saved: dict | None) -> tuple[dict | None, bool, bool]:
        """(config.toml's values with its prompts path as this command's where the content is the same,
        whether the file moved, whether the content differs). A run without PROMPTS_HASH (made before
        it) compares the paths alone, as it did."""
        path = self.dir / PROMPTS_HASH
        if saved is None or self.world is not None or not path.exists():
            return saved, False, False
        same = self._saved_hash()[0] == self.prompts_sha256()
        moved = same and saved.get("prompts") != self.cfg.prompts
        if moved and parallel.is_main():
            log.warning("%s: the prompts moved (%r there, %r now; the same content); the run goes on with %r",
                        self.dir, saved.get("prompts"), self.cfg.prompts, self.cfg.prompts)
        return ({**saved, "prompts": self.cfg.prompts} if same else saved), moved, not same

    def _refuse_other_prompts(self) -> None:
        raise MtcoreError(f"{self.dir} holds a run on other prompts: {self.cfg.prompts} does not hold the content it "
                          f"started from (its {PROMPTS_HASH}); resume it with those prompts, or give another --out")

    def _record_prompts(self, config_file: Path) -> None:
        """A resumed run's prompts as this command gives them: config.toml names their path now, and a
        run made before PROMPTS_HASH gets it. Only a record: where it cannot be written (a read-only
        mount) the run goes on, and the next rerun finds the same."""
        try:
            self._write_prompts_hash()
            write_text_atomic(config_file, to_toml({**read_config_file(config_file), "prompts": self.cfg.prompts}))
        except MtcoreError as e:
            log.warning("%s: the prompts' record is not updated (%s)", self.dir, e)

    def _write_prompts_hash(self, fresh: bool = False) -> None:
        """PROMPTS_HASH for the prompts given; fresh: a new run's (its splits cut from one shuffle)."""
        if self.world is None:
            counts = [len(self._prompts())] if fresh else self._counts()
            write_text_atomic(self.dir / PROMPTS_HASH, " ".join([self.prompts_sha256(), *map(str, counts)]) + "\n")

    def _replace(self, changed: list[str]) -> None:
        """A directory in which no iteration's stage has finished takes this command's config. The
        initial evaluation is done again; the first stage's saved shards are kept unless a key they
        depend on changed."""
        log.warning("%s: no iteration's stage had finished; its config.toml and splits.json are replaced by this "
                    "command's (%s)", self.dir, ", ".join(changed) or "splits.json was missing")
        if set(changed) & SHARD_KEYS:
            for d in self.dir.glob("iter_*"):
                shutil.rmtree(d, ignore_errors=True)
        for f in self.dir.glob("initial*"):  # results, and the saved shards of one in progress
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
        self.state = {"done": [], "stopped_at": None, "failed": None}
        write_json(self.dir / "state.json", self.state)

    def _check_new_run(self) -> None:
        """Everything the first stages would find, before anything is written: the base models, the
        prompt splits (made here), the chat templates, the prompts against the models' context, the
        batch sizes against the data."""
        policy_args, _ = check_checkpoint(self.base_policy, "policy")
        reward_args, _ = check_checkpoint(self.base_reward, "reward")
        if self.cfg.rm_eval:
            rmeval.read_eval_pairs(self.cfg.rm_eval)
        self.splits = self._new_splits()
        if self.world is None:
            from mtcore import preflight

            preflight.check(self, policy_args, reward_args)

    def _begun(self) -> int:
        """The last iteration a stage of which is done (0: none)."""
        return max((int(k.split("/")[0].removeprefix("iter_")) for k in self.state["done"] if k.startswith("iter_")),
                   default=0)

    def _splits_for_iters(self, saved: dict, splits_file: Path) -> dict:
        """The resumed run's splits. A larger --iters extends the run (new policy splits after the old
        ones, which are unchanged), a smaller one ends it sooner, but never before an iteration it
        has begun; a run that stopped early (tau) stays stopped."""
        iters, saved_iters = self.cfg.iters, saved.get("iters")
        if type(saved_iters) is not int or saved_iters < 1:
            raise MtcoreError(f"{self.dir / 'config.toml'}: no iteration count (iters); {CONFIG_ADVICE}")
        begun = self._begun()
        if iters < begun:
            raise MtcoreError(f"--iters {iters}: {self.dir} has already begun iteration {begun}; give --iters "
                              f"{begun} or more (its config.toml has {saved_iters})")
        splits = read_splits(splits_file, min(iters, saved_iters))
        stopped = self.state["stopped_at"]
        if iters == saved_iters or stopped is not None:  # a stopped run is finished: nothing is written
            if iters > saved_iters and parallel.is_main():
                advice = "" if self.world is not None else (
                    f"; to go on from its last models, start a new run with --policy {self.policy(stopped - 1)}"
                    + (f" --reward {self.reward(stopped - 1)}" if self.cfg.m_step else ""))
                log.warning("%s stopped early at iteration %d (its best candidate's win rate was below tau), so it "
                            "stays stopped and --iters %d runs nothing more%s", self.dir, stopped, iters, advice)
            return splits
        if iters > saved_iters:
            if self.world is None and self.cfg.policy_split_size == 0:
                raise MtcoreError(f"--iters {iters}: {self.dir} split its prompts evenly over its {saved_iters} "
                                  f"iterations (policy_split_size = 0), so it cannot be extended; give --iters "
                                  f"{saved_iters}, or start a new run from its last policy")
            new = self._new_splits() if self.world is not None else self._extended_splits(splits, saved_iters)
            changed = [k for k in splits if new.get(k) != splits[k]]
            if changed:
                raise MtcoreError(f"--iters {iters}: the toy world no longer gives this run's {changed[0]} split")
            if parallel.is_main():
                log.warning("%s: extending the run from %d to %d iterations (new policy splits policy_%d..policy_%d)",
                            self.dir, saved_iters, iters, saved_iters + 1, iters)
            splits = new
        elif parallel.is_main():
            log.warning("%s: --iters %d ends the run sooner than its config's %d", self.dir, iters, saved_iters)
        if parallel.is_main():
            write_json(splits_file, splits)
            self._write_prompts_hash()  # prompts appended to extend the run are its prompts now
            write_text_atomic(self.dir / "config.toml", to_toml({**saved, "iters": iters}))
        return splits

    def _check_same_config(self, saved: dict) -> dict:
        """The run directory's config must be this one, except the runtime keys, --iters (_splits_for_iters)
        and the training keys of a stage that stopped at a NaN/inf loss (a rerun with a lower learning
        rate goes on from it). Returns the config as the directory now holds it."""
        mine = identity(self.cfg)
        failed = self.state.get("failed")
        retry = RETRY_KEYS[failed.rsplit("/", 1)[1]] if failed else ()
        full, full_mine = {**LATER_KEYS, **saved}, {**LATER_KEYS, **mine}  # a later key left out: its default
        diff = [k for k in sorted(set(full) | set(full_mine)) if full.get(k) != full_mine.get(k) and k != "iters"]
        lacks = [k for k in diff if k not in full]
        if lacks and not [k for k in diff if k in full and k not in retry]:  # what it holds is ours: cut short
            raise MtcoreError(f"{self.dir / 'config.toml'}: lacks {lacks[0]}"
                              + (f" and {len(lacks) - 1} more" if len(lacks) > 1 else "")
                              + f" (cut short, or written by another version of mtcore); {CONFIG_ADVICE}")
        refused = [k for k in diff if k not in retry]
        if refused:
            listed = "; ".join(f"{k} {_shown(k, full.get(k))} there, {_shown(k, full_mine.get(k))} now"
                               for k in refused)
            raise MtcoreError(f"{self.dir} holds a run with another config ({listed}); resume it with its own "
                              f"values (its config.toml: --config {self.dir / 'config.toml'}), extend it with a "
                              f"larger --iters, or give another --out")
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
            saved = {**mine, "iters": saved["iters"]}
            if parallel.is_main():
                write_json(self.dir / "state.json", self.state)
                write_text_atomic(self.dir / "config.toml", to_toml(saved))
        return saved

    def _redo(self, key: str) -> None:
        """--redo KEY: KEY and every stage done after it are marked not done (state.json lists them in
        the order they were done), so this run does them again; the stages before it are kept."""
        done = self.state["done"]
        if key not in done:
            raise MtcoreError(f"--redo {key}: not a finished stage of {self.dir} (finished: {', '.join(done) or 'none'})")
        self.state["done"] = done[:done.index(key)]
        for shards in self.dir.glob("iter_*/*.shards"):  # a stage in progress: its inputs may be redone
            if not self.is_done(f"{shards.parent.name}/{shards.name.removesuffix('.shards')}"):
                shutil.rmtree(shards, ignore_errors=True)
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

    def _new_splits(self) -> dict:
        """The prompt splits made afresh, as splits.json holds them (sorted keys), so a resumed run reads
        the same bytes and a comparison with the saved ones is exact."""
        return json.loads(json.dumps(self._make_splits(), sort_keys=True))

    def _make_splits(self) -> dict:
        cfg = self.cfg
        if self.world is not None:
            return self.world.make_splits(cfg)
        prompts = list(self._prompts())
        random.Random(cfg.seed).shuffle(prompts)
        sizes = split_sizes(cfg, len(prompts), str(self._source()))
        splits, start = {}, 0
        for name, n in sizes.items():
            splits[name], start = prompts[start:start + n], start + n
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
