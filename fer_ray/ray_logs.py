"""Ray's console lines that a fer_ray job's output does not need.

Training printed two of Ray Data's lines per epoch beside its own epoch line ("Dataset
train_... execution finished in 15.0 seconds", from the split coordinator), every process
that runs Ray Data warned "Progress bars disabled" (fer_ray turns them off on purpose: the
epoch line is the progress) and every read of the shards logged its Parquet estimates.
So are the lines each Dataset's run begins with (its plan), the Parquet writer's "Data sink
Parquet finished" and, where stdout is no terminal, all of Ray Data's logged progress but its
total. These records are marked hidden, as Ray Data marks its own file-only records: its console
handler leaves them out and its log file (ray-data.log in the session's logs) keeps them.
Warnings about anything else and errors are untouched.

Two of Ray's lines about resuming contradict fer_ray's own and are dropped (from Ray's log
files too; fer_ray's lines say what happens): Ray Train's "A run snapshot was found ... If
you meant to start a brand new training job ... delete the existing folder" on every resumed
run (deleting it throws the run's checkpoints away; fer_ray says "Resuming after epoch N"),
and Tune's "Resume experiment with: Tuner.restore(...)" on a stopped sweep (fer_ray's line
says to rerun the same command).

`hide_ray_noise` runs in the driver (fer_ray.cli.setup_logging) and, for training and
sweeps, as the job's `worker_process_setup_hook` in every Ray worker process of the job
(fer_ray.cli._ray_init): the per-epoch lines come from Ray Data's own actors. Standard
library only: the hook is shipped to the workers pickled by value, with this module.
"""

from __future__ import annotations

import logging

# Logger -> the messages hidden (Ray Data's console only), by a piece of their text.
HIDDEN = {
    "ray.data._internal.progress": ("Progress bars disabled", "Progress will be logged because",
                                    "A new progress UI is available"),
    "ray.data._internal.execution.streaming_executor": (" execution finished in ", "Starting execution of Dataset",
                                                        "Execution plan of Dataset"),
    "ray.data._internal.datasource.parquet_datasource": ("Estimated parquet ",),
    "ray.data.dataset": ("Data sink Parquet finished",),
}
# Logger -> the only messages of its shown (Ray Data's console only). Where stdout is no
# terminal (`ray job logs`, CI), Ray Data logs its progress every 10 s, about ten lines each
# time (one per operator, its tasks, resources, separators) for every split jobs/prepare.py
# writes; the total, "Total Progress: 12000/28709", is kept as the progress line.
SHOWN_ONLY = {
    "ray.data._internal.progress.logging_progress": ("Total Progress",),
}

# Logger -> the messages dropped, by a piece of their text.
DROPPED = {
    "ray.train.v2._internal.execution.checkpoint.checkpoint_manager": ("If you meant to start a brand new training job",),
    "ray.tune.tune": ("Resume experiment with: ", "Resume training with: "),
}


class _Hide(logging.Filter):
    def __init__(self, pieces: tuple[str, ...], drop: bool = False, unless: bool = False) -> None:
        super().__init__()
        self.pieces, self.drop, self.unless = pieces, drop, unless

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.WARNING:
            message = record.getMessage()
            if any(piece in message for piece in self.pieces) != self.unless:
                if self.drop:
                    return False
                record.hide = True  # Ray Data's console handler skips these (HiddenRecordFilter)
        return True


def hide_ray_noise() -> None:
    """Mark HIDDEN's records hidden from the console and drop DROPPED's (once per process;
    before or after Ray is imported: the filters sit on the loggers, which Ray's set-up keeps)."""
    for table, drop, unless in ((HIDDEN, False, False), (SHOWN_ONLY, False, True), (DROPPED, True, False)):
        for name, pieces in table.items():
            logger = logging.getLogger(name)
            if not any(isinstance(f, _Hide) for f in logger.filters):
                logger.addFilter(_Hide(pieces, drop, unless))
