"""The runtime around a job: the worker that claims train jobs and runs them (`worker`), what it
does between two steps (`run_hooks`: events, checkpoints, cancel, stop), the safety sidecar's
level it follows and obeys (`safety_monitor`, `safety_gate`) and the experiment trackers it
reports to (`tracking`). A run in several processes: the worker starts them (`launcher`), each
runs `rank_process`, and `ranks` says who speaks for the run and what they agree on."""
