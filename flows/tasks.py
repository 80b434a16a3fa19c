"""Prefect tasks of the demo that are not part of the benchmark recipe: writing the digits, and the combined
report. Both are library calls (`pipeline.demo`, `pipeline.recipe`); they take paths and return paths and small
dicts."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.recipe import write_combined_report


@task(name="prepare-digits", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def prepare_digits(root: str, per_class: int | None = None) -> str:
    """Write the digits image folder (first run only). File I/O, so it may retry."""
    from pipeline.demo import write_digits_folder

    return str(write_digits_folder(root, per_class=per_class))


report = task(name="report", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)(write_combined_report)
