"""Cluster entry point for building shard sets: `python cluster/make_shards.py ...`.

A thin wrapper over `hncl make-shards` so that `ray job submit -- python cluster/make_shards.py`
and the console command run the same code.
"""

import sys

from hncl.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-shards", *sys.argv[1:]]))
