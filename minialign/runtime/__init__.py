"""The machinery every stage shares; not part of the course (read the top of the package first).

- ``files``: atomic writes, fingerprints, and the expected errors the command line prints in one line
- ``distributed``: torchrun (DDP) and gradient accumulation; no-ops in one process
- ``datafiles``: a user's data files in TRL's format (``--data``), checked row by row
- ``loading``: where a stage's models come from and where the trained one goes
- ``cli``: the ``minialign`` command
- ``old_paths``: the old import paths of the modules that moved here (``minialign.loading``, ...)
"""
