"""Infrastructure a run stands on: processes and devices (:mod:`.distributed`,
:mod:`.runtime`), SLURM / submitit jobs (:mod:`.cluster`), run directories (:mod:`.run_dirs`)
and whether a recorded run is still alive (:mod:`.liveness`)."""
