"""A dataset in the model's tokens: conversations through the model's own chat template with the
trained tokens marked (`templating`), several to a row (`packing`), which rows a run takes and
in what order (`selection`), and their lengths before anything trains (`token_stats`)."""
