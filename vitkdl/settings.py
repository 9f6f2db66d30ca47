"""How to run: the settings a user gives once, shared by every record of a run.

``vitkdl run`` says how to run in one place, :class:`RunSettings`; the records that carry a run
through its stages add only what is their own:

- :class:`RunRequest`: one run as asked (its overrides, ``--resume``, whether an unfinished
  run is continued, how the console introduces a dependency);
- :class:`vitkdl.train.jobs.JobOptions`: an experiment's runs (how many at once, the launcher,
  processes per run);
- :class:`vitkdl.train.worker.Task`: a :class:`RunRequest` sent to the inline launcher or a
  worker (its recipe, folder, threads; it travels as JSON);
- :class:`vitkdl.train.loop.RunOptions`: what the training loop reads (the run's folder, the
  checkpoint to resume from, evaluation batches, whether to load teacher weights), made from
  a :class:`RunRequest` in one place (:func:`vitkdl.train.runner.run_recipe`).

Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class RunSettings:
    """How to run, as asked once: where the runs go and on what, whether to train finished
    runs again, a smoke run, quiet output, a step limit."""

    out_root: Path = Path("runs")
    device: str | None = None  # cpu, cuda, cuda:1 (None: cuda if any)
    force: bool = False  # train a finished run again / start an unfinished one over
    smoke: bool = False  # a few steps of the real models on synthetic data
    quiet: bool = False  # only the final tables
    max_steps: int | None = None  # stop each run after N optimizer steps

    def settings(self) -> RunSettings:
        """These settings alone (of a record that derives from them)."""
        return RunSettings(**{f.name: getattr(self, f.name) for f in fields(RunSettings)})

    def settings_dict(self) -> dict[str, object]:
        """These settings as keyword arguments (for the record of the next stage)."""
        return {f.name: getattr(self, f.name) for f in fields(RunSettings)}


@dataclass(frozen=True)
class RunRequest(RunSettings):
    """One run as asked: the settings and what is the run's own."""

    overrides: tuple[str, ...] = ()
    resume: bool = False  # --resume: continue from the run's checkpoint
    # Continue an unfinished run instead of refusing to start it over: the runs of an
    # experiment, and the teacher and baseline of a recipe (the user did not name them).
    continue_unfinished: bool = False
    # How the console introduces a run that another needs (its teacher, its baseline), in rich
    # markup; empty for a recipe named on the command line.
    why: str = ""
