"""What a run will be, decided before any weight loads: the wire config validated (`config`),
the smart defaults settled at submit (`defaults`), its peak memory predicted from the model's
config (`memory_estimate`) and, on a GPU, the adapter and micro-batch that fit the card
(`memory_plan`)."""
