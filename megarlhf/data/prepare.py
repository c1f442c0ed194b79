"""``megarlhf prepare-data RECIPE [--config FILE] [key=value ...] [--force]``

Downloads every hub source of a recipe's config (each ``data.sources[i].path`` that is
not a local file) into the prepared-data cache, on a machine with internet (a login
node), before the job is submitted; then reads the sources back as RECIPE does (schema,
malformed rows, duplicates) from the cache and local files alone, and prints what each
holds. RECIPE is the command the config is for (sft, rm, dpo or ppo): it names the
config's schema and the kind of examples the data must give.

    megarlhf prepare-data ppo --config examples/ppo_13b_70b_rm.yaml
    sbatch slurm/ppo_70b_rm.sh data.offline=true      # compute nodes never contact the hub

The cache is ``data.cache_dir``, else ``$MEGARLHF_DATA_CACHE``, else
``~/.cache/megarlhf/data``: it must be the same folder, on storage the compute nodes see,
when the job runs (sbatch passes the submitting shell's environment to the job).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from megarlhf.cli import COMMANDS
from megarlhf.config import ConfigError, ConfigLoadError, load_config
from megarlhf.data.dataset import data_problems
from megarlhf.data.errors import DataError
from megarlhf.data.hub import CACHE_ENV, HubCache, default_cache_dir, offline_reason
from megarlhf.data.load import is_local_path, load_examples

__all__ = ["main", "RECIPE_KINDS"]

# The kind of examples each recipe builds from data.sources (its build_dataset call).
RECIPE_KINDS = {"sft": "sft", "rm": "preference", "dpo": "preference", "ppo": "prompts"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megarlhf prepare-data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", choices=sorted(RECIPE_KINDS),
                    help="the recipe the config is for (its schema and kind of data)")
    ap.add_argument("--config", default=None, help="the recipe's YAML config file")
    ap.add_argument("--force", action="store_true",
                    help="download every hub source again, even where a verified copy exists")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for the recipe")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    # intermixed: overrides may come after --config, as on the recipes' command line
    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    me = "megarlhf prepare-data"
    schema, _ = COMMANDS[args.recipe][0]()
    try:
        cfg = load_config(schema, args.config, args.overrides)
        problems = data_problems(cfg.data)  # only the data: the rest matters to the job
        if problems:
            raise ConfigError(problems)
    except (ConfigLoadError, ConfigError) as e:
        print(f"{me}: {e}", file=sys.stderr)
        return 2
    data = cfg.data
    if not data.sources:
        print(f"{me}: the config names no data sources (the recipe's built-in data): nothing to prepare")
        return 0
    # The switches that keep a job off the hub (data.offline, HF_HUB_OFFLINE) are for the
    # job's compute nodes: preparing is what contacts the hub.
    hub = HubCache(data.cache_dir or default_cache_dir())
    where = ("data.cache_dir" if data.cache_dir else f"${CACHE_ENV}" if os.environ.get(CACHE_ENV)
             else f"the default; where the compute nodes do not see it, set ${CACHE_ENV} or data.cache_dir")
    print(f"{me}: cache {hub.root} ({where})")
    try:
        for src in data.sources:
            if is_local_path(src.path):
                print(f"  {src.path}: a local file, read by the job itself")
                continue
            copy = hub.prepare(src.path, src.split, force=args.force)
            what = "downloaded" if copy.downloaded else "already prepared, verified"
            print(f"  {src.path} (split {src.split}): {what}: {copy.rows} rows, {copy.bytes} bytes "
                  f"-> {copy.file}")
        _, report = load_examples(data.sources, RECIPE_KINDS[args.recipe], skip_invalid=data.skip_invalid,
                                  dedup=data.dedup, seed=data.seed, rule=data.pair_rule, hub=hub)
    except DataError as e:
        note = offline_reason(False)
        print(f"{me}: {e}" + (f" (note: {note} is set in this shell)" if note else ""), file=sys.stderr)
        return 1
    for line in report.lines():
        print(f"  {args.recipe} data: {line}")
    print(f"{me}: ready; a job with this config and cache reads its hub sources from the cache "
          "(data.offline=true or HF_HUB_OFFLINE=1 keeps it off the hub)")
    return 0

