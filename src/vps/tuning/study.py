"""The study loop of `vps tune`: an Optuna study in SQLite inside the run directory, resumed by rerunning.

One process works in a directory at a time (its ``.lock``, as for ``vps eval``), so a trial still
marked running when a study opens was cut off by a kill: it is marked failed, is not counted, and its
parameters are queued to run again. A trial reaches a verdict when it completes, is pruned, or fails
on its own (its patched NLL was not finite: `TrialFailed`; its configuration was refused: a `ConfigError`
from building it, or a rank larger than a patched layer allows): those count toward the target. Any
other exception raised while a trial runs is an error, not a verdict: it is raised, and the trial is
left uncounted and queued to run again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import check_resume, dumps_strict, lock_directory, read_json_object, write_atomic
from ..config import ConfigError, VPSConfig
from ..evaluation.data import Item
from ..prompting import PromptFormat, PromptSettings
from . import report as reporting
from .files import SETTINGS_FILE, STUDY_FILE, STUDY_NAME
from .objective import BaseNLL, PartialScores, Pruned, ScoringTask, TrialFailed, prefill_ratio, score_trial
from .placement import Placement, check_ranks, trial_config
from .settings import NOT_COMPARED, TuneSettings

__all__ = ["TuneResult", "run_study"]


@dataclass(frozen=True)
class TuneResult:
    """How a study stands after a run: trials with a verdict, the best trial's number, value and config."""

    directory: Path
    counted: int
    best_number: int | None
    best_value: float | None
    best_config: VPSConfig | None


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(directory: Path, settings: TuneSettings, n_existing: int | None = None) -> Any:
    """The directory's study (created on first use). The sampler's seed moves on with the number of
    trials already run, so a resumed study does not replay the random draws it started with."""
    optuna = _optuna()
    storage = f"sqlite:///{(directory / STUDY_FILE).resolve()}"
    if n_existing is None:
        try:
            n_existing = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
        except KeyError:
            n_existing = 0
    sampler = optuna.samplers.TPESampler(seed=settings.seed + n_existing, n_startup_trials=10)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup,
                                          n_warmup_steps=settings.prune_warmup)
              if settings.prunes else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True, sampler=sampler,
                               pruner=pruner, directions=["minimize"] * len(settings.objectives))


def counted_trials(study: Any) -> list[Any]:
    """Trials with a verdict: complete, pruned, or failed on their own (not cut off by an interruption)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "failure" in t.user_attrs)]


def recover_interrupted(study: Any, log: Callable[[str], None]) -> int:
    """Mark trials left running by a dead process failed and queue their parameters again."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
    if stale:
        log(f"tune: {len(stale)} trial(s) interrupted by an earlier run ({', '.join(str(t.number) for t in stale)}) "
            f"marked failed, not counted, and queued to run again")
    return len(stale)


def run_study(model: Any, tokenizer: Any, items: Sequence[Item], directory: str | Path, settings: TuneSettings,
              space: Any, n_trials: int, progress: bool = True, log: Callable[[str], None] | None = None) -> TuneResult:
    """Run trials in ``directory`` until ``n_trials`` have a verdict (resuming what is there), then write
    ``trials.jsonl``, ``best.json``, ``best_trial.json``, ``report.md`` and ``report.png``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    directory = Path(directory)
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    placement = Placement.of(model)
    modules_and_blocks = space.placement
    placement.check(modules_and_blocks["modules"], modules_and_blocks["blocks"], space.source)
    with lock_directory(directory):
        settings_path = directory / SETTINGS_FILE
        new = settings.to_dict()
        if settings_path.exists():
            check_resume(read_json_object(settings_path), new, str(directory), settings_path, kind="study",
                         skip=NOT_COMPARED)
        else:
            write_atomic(settings_path, dumps_strict(new, indent=2) + "\n")
        study = open_study(directory, settings)
        recover_interrupted(study, log)

        fmt = _prompt_format(settings)
        task = ScoringTask.build([it.id for it in items], [fmt.render(tokenizer, it.question) for it in items],
                                 [fmt.solution_prefix + it.answer for it in items], tokenizer, settings.batch_size)
        base = BaseNLL(directory, settings.fingerprint())
        if not base.complete(task):
            with _bar(progress, "unpatched NLL", len(items), sum(i in base.values for i in task.ids)) as bar:
                base.compute(model, tokenizer, task, bar.update if bar else None)
        if not any(base.values.get(i) is not None for i in task.ids):
            # Every trial would fail the same way, whatever its configuration: not a verdict on any of them.
            raise ValueError(f"the unpatched model gives no finite NLL on any of the {len(task.ids)} items, so no "
                             f"configuration can be scored; check the data and the model")
        done = len(counted_trials(study))
        if done >= n_trials:
            log(f"tune: {done} trial(s) already have a verdict in {directory} (asked for {n_trials})")
        with _bar(progress, "trials", n_trials, min(done, n_trials)) as bar:
            while done < n_trials:
                _one_trial(study, model, tokenizer, task, base.values, settings, space, placement, progress, directory,
                           log)
                done = len(counted_trials(study))
                reporting.write_trials(directory, study, settings)
                reporting.write_outputs(directory, study, settings, space)  # current after every trial
                if bar is not None:
                    bar.update(1)
                    best = reporting.best_trial(study)
                    if best is not None:
                        bar.set_postfix_str(f"best {best.values[0]:+.4f} (#{best.number})")
        reporting.write_trials(directory, study, settings)
        best = reporting.write_outputs(directory, study, settings, space)
    return TuneResult(directory, done, None if best is None else best.number,
                      None if best is None else best.values[0],
                      None if best is None else VPSConfig.from_dict(best.user_attrs["config"]))


def _prompt_format(settings: TuneSettings) -> PromptFormat:
    return PromptSettings(settings.prompt, settings.shots, settings.system).format()


def _one_trial(study: Any, model: Any, tokenizer: Any, task: ScoringTask, base: dict[str, float | None],
               settings: TuneSettings, space: Any, placement: Placement, progress: bool, directory: Path,
               log: Callable[[str], None]) -> None:
    from optuna.trial import TrialState

    trial = study.ask()
    try:
        params = space.suggest(trial)
        try:
            chosen = trial_config(params, placement)
            check_ranks(model, chosen.config)
        except ConfigError as exc:
            trial.set_user_attr("failure", f"configuration refused: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            return
        trial.set_user_attr("config", chosen.config.to_dict())
        trial.set_user_attr("labels", chosen.labels)

        def report(value: float, step: int) -> bool:
            if not settings.prunes:
                return False
            trial.report(value, step)
            return trial.should_prune()

        partial = PartialScores(directory, settings.fingerprint(), chosen.config.to_dict())
        if partial.values:
            log(f"tune: trial {trial.number} continues its configuration's interrupted run: "
                f"{len(partial.values)} of {len(task.ids)} items already scored")
        with _bar(progress, f"trial {trial.number}", len(task.ids), 0, leave=False) as bar:
            try:
                score = score_trial(model, tokenizer, chosen.config, task, base, report,
                                    bar.update if bar else None, seed=settings.seed, partial=partial)
            except Pruned as exc:
                partial.clear()
                trial.set_user_attr("pruned_at", exc.step)
                study.tell(trial, state=TrialState.PRUNED)
                return
            except TrialFailed as exc:
                partial.clear()
                trial.set_user_attr("failure", str(exc))
                study.tell(trial, state=TrialState.FAIL)
                return
        partial.clear()
        trial.set_user_attr("ci", [score.low, score.high])
        trial.set_user_attr("n", score.n)
        trial.set_user_attr("seconds", score.seconds)
        trial.set_user_attr("nll", score.nll)
        if (fallbacks := score.fallback_summary()) is not None:
            trial.set_user_attr("fallbacks", fallbacks)
        values = [score.mean]
        if "overhead" in settings.objectives:
            ratio = prefill_ratio(model, tokenizer, chosen.config, [task.prompts[i] for i in task.batches[0]])
            trial.set_user_attr("overhead", ratio)
            values.append(ratio)
        study.tell(trial, values)
    except BaseException:
        # Cut off (Ctrl-C, or an error in our own code): not a verdict on the configuration, so it is
        # failed without a "failure" reason, not counted, and queued to run again.
        if study.get_trials(deepcopy=False)[trial.number].state == TrialState.RUNNING:
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        raise


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _bar(enabled: bool, desc: str, total: int, initial: int, leave: bool = True) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="trial" if desc == "trials" else "item",
                dynamic_ncols=True, file=sys.stderr, leave=leave)
