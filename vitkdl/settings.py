"""How to run: the settings a user gives once, shared by every record of a run.

``vitkdl run`` says how to run in one place, :class:`RunSettings`; the records that carry a run
through its stages add only what is their own:

- :class:`vitkdl.train.runner.RunRequest`: one recipe's runs (overrides, ``--resume``, the
  baseline, continuing a dependency);
- :class:`vitkdl.train.jobs.JobOptions`: an experiment's runs (how many at once, the launcher,
  processes per run);
- :class:`vitkdl.train.worker.Task`: one run sent to a worker (its recipe, folder, overrides,
  threads; it travels as JSON);
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
