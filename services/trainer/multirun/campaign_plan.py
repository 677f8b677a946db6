"""Which rows each run of a campaign trains on, and the checks a campaign must pass before it is
queued.

One dataset is a pool: shuffled once by the campaign's seed and cut into disjoint slices of
`samples_per_run` rows, so no run sees another's rows (the point of continual training is new
data each run) and the campaign must fit in the pool. With replacement each run draws its rows
from the whole pool on its own, duplicates allowed. Several datasets are one per run, in order:
each run takes `samples_per_run` of its own (all of them by default).

With `replay` (rehearsal, the strongest guard against forgetting in the continual-learning
literature), runs 2.. also train on rows earlier runs of the campaign trained on: `replay` times
their own row count, drawn from all of them; a tenth unless the campaign says otherwise (0: none).

Every draw is a function of the seed and the run's number, so a resumed campaign trains each
run on the very rows the uninterrupted one would have.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from backpropagate_api.errors import ConfigError, quoted
from backpropagate_api.training import DEFAULT_REPLAY, SCALABLE_ADAPTERS, TrainingConfig
from backpropagate_api.v1 import common_pb2, trainer_pb2
from backpropagate_services.trainer.multirun.slao import MERGE_MODES

DEFAULT_ADAPTER = TrainingConfig().adapter

DEFAULT_MERGE = "slao"
MAX_RUNS = 1000


@dataclass(frozen=True)
class CampaignPlan:
    runs: int
    samples_per_run: int  # 0: a dataset's share of the pool, or the whole of each dataset
    with_replacement: bool
    seed: int
    dataset_ids: tuple[str, ...]
    replay: float = 0.0  # a share of each run's own rows, drawn again from earlier runs' rows

    @classmethod
    def of(cls, campaign: trainer_pb2.CampaignInfo, seed: int) -> CampaignPlan:
        settled = campaign.config
        return cls(
            settled.runs,
            settled.samples_per_run,
            settled.with_replacement,
            seed,
            tuple(campaign.dataset_ids),
            settled.replay,
        )

    def dataset_of(self, run: int) -> str:
        return self.dataset_ids[0] if len(self.dataset_ids) == 1 else self.dataset_ids[run - 1]

    def rows_of(self, run: int, pool_size: int) -> list[int]:
        """Indices of the rows run `run` (1-based) trains on, in a dataset of `pool_size`."""
        draw = random.Random(f"campaign-{self.seed}-{run}")
        if len(self.dataset_ids) > 1:
            size = self.samples_per_run or pool_size
            if self.with_replacement:
                return draw.choices(range(pool_size), k=size)
            return sorted(draw.sample(range(pool_size), size))
        size = self.samples_per_run or max(pool_size // self.runs, 1)
        if self.with_replacement:
            return draw.choices(range(pool_size), k=size)
        order = list(range(pool_size))
        random.Random(f"campaign-{self.seed}").shuffle(order)
        return sorted(order[(run - 1) * size : run * size])

    def replayed_of(self, run: int, sizes: Mapping[str, int]) -> list[tuple[int, int]]:
        """The rows run `run` trains on again: (earlier run, row index in that run's dataset),
        `replay` times its own row count (at least one), drawn without repeats from every row
        runs 1 .. run - 1 trained on. `sizes`: the rows of each dataset, by id."""
        if not self.replay or run < 2:
            return []
        earlier = [
            (before, index)
            for before in range(1, run)
            for index in self.rows_of(before, sizes[self.dataset_of(before)])
        ]
        own = len(self.rows_of(run, sizes[self.dataset_of(run)]))
        wanted = min(max(round(self.replay * own), 1), len(earlier))
        return random.Random(f"campaign-{self.seed}-{run}-replay").sample(earlier, wanted)


def settle_campaign(
    multi_run: trainer_pb2.MultiRunConfig, dataset_sizes: list[int]
) -> trainer_pb2.MultiRunConfig:
    """`multi_run` with its defaults filled in (runs from the datasets given, the merge, the
    replay), or a ConfigError naming what cannot work: a campaign is refused before it is
    queued."""
    settled = trainer_pb2.MultiRunConfig()
    settled.CopyFrom(multi_run)
    settled.merge = multi_run.merge or DEFAULT_MERGE
    settled.replay = multi_run.replay if multi_run.HasField("replay") else DEFAULT_REPLAY
    if settled.merge not in MERGE_MODES:
        raise ConfigError(
            f"Unknown merge mode {quoted(settled.merge)}.",
            hint=f"Use one of {', '.join(MERGE_MODES)} (slao is the default).",
            fields="merge",
        )
    several = len(dataset_sizes) > 1
    settled.runs = multi_run.runs or (len(dataset_sizes) if several else 0)
    if not 1 <= settled.runs <= MAX_RUNS:
        raise ConfigError(
            f"A campaign needs between 1 and {MAX_RUNS} runs; {multi_run.runs} were asked for.",
            hint="Pass --runs N (or one --data per run).",
            fields="runs",
        )
    if several and settled.runs != len(dataset_sizes):
        raise ConfigError(
            f"{len(dataset_sizes)} datasets were given for {settled.runs} runs: with several "
            "datasets each run trains on its own.",
            hint="Give one --data per run, or one dataset for every run to sample.",
            fields="runs,data",
        )
    if multi_run.samples_per_run < 0:
        raise ConfigError("samples_per_run must be >= 0.", fields="samples_per_run")
    if not 0 <= multi_run.replay <= 1:
        raise ConfigError(
            f"replay is a share of each run's rows, between 0 and 1; {multi_run.replay:g} was "
            "asked for.",
            hint="Pass --replay 0.1 to train each run on a tenth more rows from earlier runs.",
            fields="replay",
        )
    if not multi_run.with_replacement:
        _check_fits(settled, dataset_sizes)
    return settled


def _check_fits(settled: trainer_pb2.MultiRunConfig, dataset_sizes: list[int]) -> None:
    """Disjoint samples must fit: each dataset holds its run's, one pool holds every run's."""
    wanted = settled.samples_per_run
    if len(dataset_sizes) > 1:
        for run, size in enumerate(dataset_sizes, start=1):
            if wanted > size:
                raise ConfigError(
                    f"Run {run}'s dataset has {size} rows; samples_per_run asks for {wanted}.",
                    hint="Lower --samples, or pass --with-replacement to draw with replacement.",
                    fields="samples_per_run",
                )
        return
    pool = dataset_sizes[0]
    if wanted * settled.runs > pool or pool < settled.runs:
        need = wanted * settled.runs or settled.runs
        raise ConfigError(
            f"{settled.runs} runs of {wanted or 1} rows need {need} distinct rows; the dataset "
            f"has {pool}, so the runs would overlap.",
            hint=f"Lower --samples to {pool // settled.runs} or --runs, give more data, or pass "
            "--with-replacement to let runs share rows.",
            fields="samples_per_run,runs",
        )


def check_campaign_config(config: trainer_pb2.TrainConfig) -> None:
    """What a campaign's runs cannot do: merging needs plain LoRA factors, B A, on chat data."""
    if config.method not in ("", "sft"):
        raise ConfigError(
            f"A campaign trains sft runs; --method {config.method} is for single runs.",
            hint="Leave out --method, or train the preference run with `backprop train`.",
            fields="method",
        )
    if config.adapter not in ("", *SCALABLE_ADAPTERS):
        raise ConfigError(
            f"A campaign merges LoRA factors; --adapter {config.adapter} has none to merge.",
            hint=f"Use one of {', '.join(SCALABLE_ADAPTERS)}.",
            fields="adapter",
        )
    if config.adapter_scale not in (0, 1):
        raise ConfigError(
            "--adapter-scale applies to single runs: in a campaign the merge weighs each run.",
            hint="Leave out --adapter-scale.",
            fields="adapter_scale",
        )
    if config.nproc_per_node > 1:
        raise ConfigError(
            "A campaign's runs train in one process each; --nproc-per-node is for single runs.",
            hint="Leave out --nproc-per-node.",
            fields="nproc_per_node",
        )


def check_continuable(earlier: trainer_pb2.RunRecord, campaign: trainer_pb2.RunRecord) -> None:
    """A campaign continues a finished campaign of the same merge, model and LoRA shape."""
    if not earlier.HasField("campaign"):
        raise ConfigError(
            f"{earlier.run_id} is a single run, not a campaign.",
            hint="Continue from a campaign id (backprop runs list).",
            fields="continue_from",
        )
    if earlier.status != common_pb2.JOB_STATUS_SUCCEEDED:
        raise ConfigError(
            f"Campaign {earlier.run_id} has not finished.",
            hint=f"Resume it first: backprop runs resume {earlier.run_id}",
            fields="continue_from",
        )
    same = {
        "merge": (earlier.campaign.config.merge, campaign.campaign.config.merge),
        "base model": (earlier.base_model, campaign.base_model),
        # "" is the default, lora, which a GPU's memory plan names (memory_plan).
        "adapter": (
            earlier.config.adapter or DEFAULT_ADAPTER,
            campaign.config.adapter or DEFAULT_ADAPTER,
        ),
        "lora_r": (earlier.config.lora_r, campaign.config.lora_r),
        "target_modules": (
            list(earlier.config.target_modules),
            list(campaign.config.target_modules),
        ),
    }
    for what, (before, now) in same.items():
        if before != now:
            raise ConfigError(
                f"Campaign {earlier.run_id} used {what} {quoted(before)}; this one {quoted(now)}.",
                hint=f"Continue with the same {what}.",
                fields="continue_from",
            )
