"""Time to the first batch after a resume deep into a data epoch, against a fresh start.

A resumed stream starts at the checkpoint's position (hncl/data/epoch_plan.py): the shards and
tar members before it are skipped unread or read without decoding. The baseline, in the same
run, is a fresh start (epoch 0, position 0); the alternative shown for scale is the replay a
stream without a saved position needs (decode and drop what was trained on). Both streams make
two augmented views per sample, one reader, no loader workers (per core).

    python benchmarks/resume_time.py [--faces 2400 --shard-size 200 --at 0.9 --rounds 5]

Writes benchmarks/results/resume_time.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleaved, median, table, write  # noqa: E402

from hncl.data.augment import view_transform  # noqa: E402
from hncl.data.epoch_plan import StreamState  # noqa: E402
from hncl.data.make_shards import ShardJob, make_shards  # noqa: E402
from hncl.data.shards import ShardSet, train_pipeline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", type=int, default=2400)
    p.add_argument("--shard-size", type=int, default=200)
    p.add_argument("--at", type=float, default=0.9, help="the resume point, as a fraction of the data epoch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set")
        make_shards(ShardJob(source="synthetic", out=out, source_options=(("num_samples", args.faces), ("seed", 0),
                                                                          ("size", 112))),
                    shard_size=args.shard_size, descriptor_dim=32, progress=False, log=lambda *_: None)
        shards = ShardSet.open(out)
        at = int(args.at * shards.num_samples)
        views = view_transform(64)

        def first_batch(position: int, replay: int = 0):
            def run():
                state = StreamState.start(shards.counts, seed=0, readers=1, block=1000)
                state.positions = [(0, position)]
                it = iter(train_pipeline(shards, args.batch, seed=0, view_transform=views, stream=state))
                for _ in range(replay // args.batch):  # what a stream without a position must do
                    next(it)
                return next(it)
            return run

        times = interleaved({"fresh start": first_batch(0), f"resume at {args.at:.0%}": first_batch(at),
                             f"replay to {args.at:.0%}": first_batch(0, replay=at)}, rounds=args.rounds)
    fresh = median(times["fresh start"])
    rows = [[name, median(t), median(t) / fresh] for name, t in times.items()]
    print(table(rows, ["first batch", "seconds (median)", "x fresh start"]))
    write("resume_time", {"args": vars(args), "seconds": times,
                          "ratio_resume_to_fresh": median(times[f"resume at {args.at:.0%}"]) / fresh,
                          "ratio_replay_to_fresh": median(times[f"replay to {args.at:.0%}"]) / fresh})


if __name__ == "__main__":
    main()
