"""Import stand-in for ``datasets``, used by benchmarks/gpu_check.py only where the real package does not import.

TRL 1.16 imports these names at module level (``trl.trainer.utils``, the trainers); the benchmarks of kernels and
TRL's chunked LM head use none of them. ``bench_trainer_step.py`` needs the real package. The GPU check installs
the real one from ``.whl/`` (benchmarks/fetch_wheels.sh) and records in ``env.json`` whether this stood in.
"""

__version__ = "0.0.0+stand-in"


class Dataset:
    pass


class IterableDataset:
    pass


class DatasetDict(dict):
    pass


class IterableDatasetDict(dict):
    pass


def concatenate_datasets(*args, **kwargs):
    raise NotImplementedError("the datasets stand-in holds no data")
