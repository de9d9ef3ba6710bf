"""Cluster entry point for pretraining: what users pass to `ray job submit`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python cluster/train.py --config configs/pretrain_r18.yaml [key=value ...]

A thin wrapper over `hncl pretrain`, so the cluster and the console run the same code.
"""

import sys

from hncl.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
