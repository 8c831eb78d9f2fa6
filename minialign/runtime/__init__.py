"""The machinery every stage shares, one idea per module; not part of the course (read the top of
the package first). The algorithm files use only a few of these helpers: the input checks
(``config.require``, ``check_range``), ``devices.autocast`` and the ``distributed`` wrappers, which
do nothing in one process; their optimizer steps arrive through the ``update`` hook of
``optim.gradient_update``.

- ``config``: ``TrainConfig`` and every command's dataclass config; the input checks (``require``,
  ``check_range``, ``check_max_new_tokens``): a bad value is refused before anything is written
- ``flags``: configs as command-line flags and back (no torch: ``minialign --help`` stays fast)
- ``devices``: seeds, devices, dtypes and autocast, the random generators a checkpoint restores
- ``optim``: AdamW, the warmup + cosine schedule, the clipped optimizer step, gradient accumulation,
  and ``gradient_update``, the hook an algorithm's step calls
- ``folders``: the rules of the run folder: ``out/<stage>.partial``, which inputs can be trusted,
  what a new run may replace
- ``run``: ``Run``, one run's lifecycle (config, JSONL metrics, status, the final rename) and its
  resumable loop
- ``stage``: the ``@stage`` decorator: every check first, the status on an error, Ctrl-C and resume
- ``plots``: every figure (``plot_panels``, ``plot_scatter``) and the plots of a run's metrics
- ``loading``: where a stage's models come from and where the trained one goes (``model.pt`` or a
  Hugging Face folder)
- ``files``: atomic writes, fingerprints, and the expected errors the command prints in one line
- ``distributed``: torchrun (DDP) and micro-batches; no-ops in one process
- ``datafiles``: a user's data files in TRL's format (``--data``), checked row by row
- ``cli``: the ``minialign`` command
"""
