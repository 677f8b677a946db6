"""The trainer service: train jobs from the queue, run records, events.

Where to look:
- `server.py`: TrainerService, the thin servicer (submit, runs, watch, import); `run_listing.py`
  pages ListRuns; `imports.py` takes in adapters trained elsewhere.
- `planning/`: what a run will be before anything loads (its config, smart defaults, memory
  estimate and the plan that fits it to its device).
- `data/`: conversations to trained tokens (chat templates, masks, packing, which rows a run
  takes, token statistics).
- `adapters/`: what trains (LoRA and its variants through peft, full fine-tuning, the dropout).
- `loop/`: the training loops, SFT and preference, and the checkpoints they write.
- `multirun/`: campaigns of runs merged by SLAO.
- `runtime/`: the worker around a job: claiming it, events, safety, trackers, stopping, and
  the processes of a run trained by several (`ranks`: rank 0 speaks for the run).
"""
