"""`mtcore train`'s driver: the Mutual-Taught iterations as stages on disk, resumable.

The algorithm is docs/algorithm.md, in code mtcore/mutual_taught.py; each step runs as a stage of
mtcore/stages.py in a run directory (mtcore/rundir.py). This file runs the stages in order:

  initial   the toy world's gold evaluation of pi_0, r_0; --rm-eval's of r_0
  t = 1..T  E-step: sample, score, pairs, dpo, select (a stop below tau ends the run here)
            M-step: msample, rm (not with --no-m-step, the fixed-RM baseline)
            then rmeval (--rm-eval) and the toy world's eval; metrics.json and a summary

A stage is skipped when state.json marks it done, so a rerun resumes at the first stage not done and
ends as an uninterrupted run. Its numbers go to iter_t/<stage>.json and then into metrics.json.
"""

import logging
import shutil
from pathlib import Path

from mtcore import parallel, preempt, profile, rmeval, stages
from mtcore.errors import MtcoreError
from mtcore.files import read_json, write_json
from mtcore.rundir import Run
from mtcore.train import NonFiniteLoss

log = logging.getLogger(__name__)


def run_stage(run: Run, t: int, name: str, fn, key: str = "", result_file: Path | None = None) -> dict:
    """A stage, unless done: run it, write iter_t/<name>.json (its numbers and profile), mark it done.
    key and result_file name another place (the initial evaluation's). A stage's end is a safe point: a
    stop signal received during a short stage (pairs, eval) stops the run here."""
    key, result_file = key or f"iter_{t}/{name}", result_file or run.iter_dir(t) / f"{name}.json"
    if run.is_done(key):
        return read_json(result_file)
    log.info("iteration %d: %s", t, name)
    try:
        with profile.Meter(run.device) as meter:
            result = fn(run, t, meter)
    except NonFiniteLoss:
        run.state["failed"] = key
        if parallel.is_main():
            write_json(run.dir / "state.json", run.state)
        raise
    result["profile"] = meter.record()
    if parallel.is_main():
        write_json(result_file, result)
    run.mark_done(key)
    if parallel.is_main():  # the stage's shards are in its output now
        shutil.rmtree(stages.shard_dir(run, t, name), ignore_errors=True)
    parallel.barrier()
    preempt.check(f"after {key}, its results saved")
    return result


def train(run: Run, echo=print, reporter=None) -> dict:
    """Run (or resume) every iteration. Returns metrics.json's content. reporter: --report-to's
    report.Reporter (default directory <run>/tb): each DPO/RM step, and each iteration's numbers."""
    run.reporter = reporter
    if reporter is not None:
        reporter.open(run.dir / "tb")
    try:
        return _iterations(run, echo)
    finally:
        if reporter is not None:
            reporter.close()


def resume_point(run: Run) -> str | None:
    """Where a run with stages done goes on, for the log: "resuming iteration 1 at dpo, after step 25 of
    40" (a training stage's saved state) or "resuming iteration 2 at sample"; None for a new run, or
    one with nothing left to run."""
    if not run.state["done"] or run.state["stopped_at"] is not None:
        return None
    for t in range(1, run.cfg.iters + 1):
        name = next((name for name, _ in stages.stages_of(run) if not run.is_done(f"iter_{t}/{name}")), None)
        if name is not None:
            return f"resuming iteration {t} at {name}" + _saved_steps(run.iter_dir(t) / f"{name}_state")
    return None


def _saved_steps(state_dir: Path) -> str:
    """", after step k of n" where a training stage saved its state (train.fit's trainer.json), else ""."""
    try:
        saved = read_json(state_dir / "trainer.json")
        return f", after step {len(saved['history'])} of {saved['run']['steps']}"
    except (MtcoreError, KeyError, TypeError):
        return ""


def _iterations(run: Run, echo) -> dict:
    """The initial evaluations, then iterations 1..T, each resumed at its first stage not done."""
    where = resume_point(run)
    if where is not None:
        log.info("%s: %s", run.dir, where)
    if run.world is not None:
        run_stage(run, 0, "eval", stages.stage_eval, key="initial/eval", result_file=run.dir / "initial.json")
    if run.cfg.rm_eval:
        run_stage(run, 0, "rmeval", stages.stage_rmeval, key="initial/rmeval", result_file=run.dir / "initial_rmeval.json")
    metrics = None  # written after each iteration run here; a run already finished writes it once below
    for t in range(1, run.cfg.iters + 1):
        if run.state["stopped_at"] is not None:
            break
        results = {}
        for name, fn in stages.stages_of(run):
            results[name] = run_stage(run, t, name, fn)
            if name == "select":
                stages.prune_candidates(run, t, results[name]["best_step"])
            if name == "select" and results[name]["stopped"]:
                if run.world is not None:  # the kept models, evaluated as this iteration's
                    results["eval"] = run_stage(run, t, "eval", stages.stage_eval)
                run.state["stopped_at"] = t
                if parallel.is_main():
                    write_json(run.dir / "state.json", run.state)
                echo(f"iteration {t}: best win rate {results[name]['win_rate']:.3f} < tau {run.cfg.tau}; "
                     f"stopping early; iter_{t} keeps the models it started from")
                break
        metrics = write_run_metrics(run)
        if run.reporter is not None and len(metrics["iterations"]) >= t:
            run.reporter.log("iteration", metrics["iterations"][t - 1], step=t, again=False)  # once, not at a rerun
        if results.get("select", {}).get("stopped") is False:
            echo(summary(run, t, results))
    return metrics if metrics is not None else write_run_metrics(run)


def write_run_metrics(run: Run) -> dict:
    """metrics.json from the per-stage result files: one entry per finished iteration. It and the plot
    are written only when their numbers changed: a rerun of a finished run writes nothing."""
    iterations = []
    for t in range(1, run.cfg.iters + 1):
        entry = {"iteration": t}
        for name, _ in stages.stages_of(run):
            f = run.iter_dir(t) / f"{name}.json"
            if f.exists():
                entry[name] = read_json(f)
        if len(entry) == 1:
            break
        entry["stage_seconds"] = {k: v["profile"]["seconds"] for k, v in entry.items() if isinstance(v, dict)}
        if "eval" in entry:
            entry.update({k: v for k, v in entry["eval"].items() if k != "profile"})
        iterations.append(entry)
    kept = final_iteration(run, [e["iteration"] for e in iterations])
    metrics = {"iterations": iterations, "stopped_at": run.state["stopped_at"], "final_iteration": kept,
               "final_policy": _in_run(run, run.policy(kept)), "final_reward": _in_run(run, run.reward(kept))}
    if (run.dir / "initial.json").exists():
        metrics["initial"] = read_json(run.dir / "initial.json")
    if (run.dir / "initial_rmeval.json").exists():
        metrics["initial_rmeval"] = read_json(run.dir / "initial_rmeval.json")
    changed = parallel.is_main() and write_json(run.dir / "metrics.json", metrics)
    if iterations and parallel.is_main() and (changed or not (run.dir / "metrics.png").exists()):
        if run.world is not None:
            run.world.plot(run.dir / "metrics.png", metrics)
        elif any("select" in e for e in iterations):
            from mtcore.plots import run_panels, save_panels

            save_panels(run.dir / "metrics.png", f"mtcore train: {run.dir.name}, per iteration"
                        + (f" (stopped at iteration {run.state['stopped_at']})" if run.state["stopped_at"] else ""),
                        run_panels(metrics, run.cfg.tau))
    return metrics


def final_iteration(run: Run, iterations: list[int]) -> int:
    """The iteration whose models the run ends with: the last one finished, or, where select stopped
    the run early at t (iter_t keeps the models it started from), t - 1 (0: the base models)."""
    done = [t for t in iterations if (run.iter_dir(t) / "policy").exists() and t != run.state["stopped_at"]]
    return done[-1] if done else 0


def _in_run(run: Run, path: Path) -> str:
    """A model's path as metrics.json stores it: relative to the run directory where it lies inside it
    (a run moved or mounted elsewhere still names its own files), else as given (a base model)."""
    try:
        return str(Path(path).relative_to(run.dir))
    except ValueError:
        return str(path)


def ending(run: Run, metrics: dict) -> str:
    """The run's last lines: how it ended, and where its models, metrics and plot are."""
    out = run.dir
    n, stopped, kept = len(metrics["iterations"]), metrics["stopped_at"], metrics["final_iteration"]
    kept_name = f"iteration {kept}'s" if kept else "the base models"
    head = (f"stopped early at iteration {stopped} (its best win rate was below tau, the method's rule; --tau "
            f"sets it): the final models are {kept_name}" if stopped is not None else f"done: {n} iterations")
    lines = [head, f"  final policy  {run.policy(kept)}", f"  reward model  {run.reward(kept)}",
             f"  metrics       {out / 'metrics.json'}"]
    if (out / "metrics.png").exists():
        lines.append(f"  plot          {out / 'metrics.png'}")
    return "\n".join(lines)


def _three(x) -> str:
    """An accuracy to three decimals; "-" for none (NaN, which a finished stage's JSON stores as null)."""
    return "-" if x is None or x != x else f"{x:.3f}"


def summary(run: Run, t: int, r: dict) -> str:
    """One screen after an iteration."""
    lines = [f"── iteration {t} ──"]
    s, p, d, sel = r["sample"], r["pairs"], r["dpo"], r["select"]
    lines.append(f"E-step  {s['responses']} responses for {s['prompts']} prompts; {p['pairs']} pairs "
                 f"({p['prompts_without_pair']} prompts without one); DPO {d['steps']} steps, loss {d['loss']:.4f}, "
                 f"accuracy {d['accuracy']:.3f}")
    lines.append(f"select  win rate {sel['win_rate']:.3f} (step {sel['best_step']}; tau {run.cfg.tau})")
    if "rm" in r:
        m, rm = r["msample"], r["rm"]
        lines.append(f"M-step  {m['pseudo_pairs']} pseudo-pairs kept (eps {m['eps']:.3f}, {m['filtered']} filtered, "
                     f"{m['identical']} identical); RM {rm['steps']} steps, loss {rm['loss']:.4f}, "
                     f"accuracy {rm['accuracy']:.3f}")
    if "eval" in r:
        e, f = r["eval"], _three
        lines.append(f"gold    win rate vs initial {f(e['gold_win_rate_vs_initial'])}, gold score "
                     f"{f(e['gold_score'])}; RM accuracy: current policy {f(e['rm_accuracy_current_policy'])}"
                     + (f" (r_0 on the same pairs {f(e['rm_accuracy_current_policy_base_rm'])})"
                        if run.cfg.m_step and "rm_accuracy_current_policy_base_rm" in e else "")
                     + f", held-out {f(e['rm_accuracy_heldout'])}"
                     + (f", shifted {f(e['rm_accuracy_shifted'])}" if "rm_accuracy_shifted" in e else ""))
        if "estep_pairs_gold_accuracy" in e:
            lines.append(f"pairs   gold-right: E-step {f(e['estep_pairs_gold_accuracy'])} "
                         f"({e['estep_pairs_gold_ties']} gold ties), pseudo-pairs "
                         f"{f(e['pseudo_pairs_gold_accuracy'])} ({e['pseudo_pairs_gold_ties']} gold ties)")
        if "pseudo_pairs_rm_gold_accuracy" in e:
            lines.append(f"        on the pseudo-pairs r_{t - 1} is {f(e['pseudo_pairs_rm_gold_accuracy'])} gold-right; "
                         f"{e['pseudo_pairs_override']} kept against it, their labels "
                         f"{f(e['pseudo_pairs_override_gold_accuracy'])} gold-right")
    if "rmeval" in r:
        lines.append("RM eval " + rmeval.sections_line(r["rmeval"]))
    lines.append("time    " + ", ".join(f"{k} {v['profile']['seconds']:.1f}s" for k, v in r.items()))
    plot = run.dir / "metrics.png"
    lines.append(f"files   policy {run.policy(t)}, reward model {run.reward(t)}, {run.dir / 'metrics.json'}"
                 + (f", {plot}" if plot.exists() else ""))
    return "\n".join(lines)
