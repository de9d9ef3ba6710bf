"""Queue scaling: lookup + enqueue time and memory per rank against Q and W (gloo processes).

Three designs, each a full queue of Q entries (heatmap keys Dk=64, embeddings De=128) serving
B queries per rank per step (top-k, k=5: HNCL's candidates):
  sharded     hncl.core.queue.ShardedNeighborQueue: each rank holds Q/W slots; all-gather the queries,
              search the local slice, exchange candidates (all_to_all), merge; enqueue is local.
  replicated  what solo-learn / MoCo do: every rank holds all Q; search locally, no query
              exchange, but every enqueue all-gathers the global batch's keys and embeddings.
and, for the local search alone, torch (one matmul + top-k) against faiss (IndexFlatIP.search
and faiss.knn) on the same slice and queries.

    python benchmarks/queue_scaling.py [--worlds 1 2 3] [--slots 8192 32768] [--global-q 98304]

One thread per process: W=3 on a 2-core machine oversubscribes it (the JSON records the cores).
Writes benchmarks/results/queue_scaling.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleaved, median, table, write  # noqa: E402

from hncl.core import dist as hdist  # noqa: E402
from hncl.core.dist import spawn_gloo  # noqa: E402
from hncl.core.queue import ShardedNeighborQueue  # noqa: E402
from hncl.core.topk import topk_stable  # noqa: E402

KEY_DIM, VALUE_DIM, K = 64, 128, 5  # the default descriptor.dim and a 128-d projection


class ReplicatedQueue:
    """The comparison design (not used in training): all Q entries on every rank."""

    def __init__(self, capacity: int, value_dim: int, key_dim: int):
        self.keys = torch.zeros(capacity, key_dim)
        self.values = torch.zeros(capacity, value_dim)
        self.ids = torch.full((capacity,), -1, dtype=torch.int64)
        self.capacity, self.ptr = capacity, 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.ids)) + self.ids.numel() * 8

    @torch.no_grad()
    def enqueue(self, keys, values, ids) -> None:
        keys, values, ids = (hdist.all_gather_rows(t) for t in (F.normalize(keys, dim=1), F.normalize(values, dim=1), ids))
        dest = (self.ptr + torch.arange(len(ids))) % self.capacity
        self.keys[dest], self.values[dest], self.ids[dest] = keys, values, ids
        self.ptr = int((self.ptr + len(ids)) % self.capacity)

    @torch.no_grad()
    def lookup(self, queries, ids, k):
        scores = F.normalize(queries, dim=1) @ self.keys.T
        scores.masked_fill_(ids.unsqueeze(1) == self.ids.unsqueeze(0), float("-inf"))
        val, slot = topk_stable(scores, k)
        return self.values[slot], val


def queue_bytes(q: ShardedNeighborQueue) -> int:
    return sum(t.numel() * t.element_size() for t in (q.keys, q.values, q.ids, q.labels))


def _fill(queue, n: int, gen: torch.Generator, offset: int) -> None:
    for start in range(0, n, 8192):  # chunks: the replicated enqueue gathers from every rank
        m = min(8192, n - start)
        queue.enqueue(torch.randn(m, KEY_DIM, generator=gen), torch.randn(m, VALUE_DIM, generator=gen),
                      torch.arange(m) + offset + start)


def measure(settings: List[Dict], batch: int, rounds: int) -> List[Dict]:
    import faiss

    faiss.omp_set_num_threads(1)
    rank, world = hdist.rank(), hdist.world_size()
    out = []
    for s in settings:
        q_global = s["q"]
        gen = torch.Generator().manual_seed(rank)
        sharded = ShardedNeighborQueue(q_global, VALUE_DIM, KEY_DIM)
        _fill(sharded, sharded.slots, gen, 10**9 + rank * sharded.slots)
        replicated = ReplicatedQueue(q_global, VALUE_DIM, KEY_DIM)
        _fill(replicated, q_global // world, gen, 10**9 + rank * q_global)
        desc = torch.randn(batch, KEY_DIM, generator=gen)
        emb = torch.randn(batch, VALUE_DIM, generator=gen)
        ids = torch.arange(batch) + rank * batch

        def step(queue):
            queue.lookup(desc, ids, K)
            queue.enqueue(desc, emb, ids)

        times = interleaved({"sharded": lambda: step(sharded), "replicated": lambda: step(replicated)},
                            rounds, 2, sync=(lambda: torch.distributed.barrier()) if world > 1 else (lambda: None))
        # the local search alone, on what the sharded design searches: W*B queries x Q/W slots
        q_all = F.normalize(torch.randn(world * batch, KEY_DIM, generator=gen), dim=1)
        keys = sharded.keys
        index = faiss.IndexFlatIP(KEY_DIM)
        index.add(keys.numpy())
        qn, kn = q_all.numpy(), keys.numpy()
        search = interleaved({
            "torch": lambda: topk_stable(q_all @ keys.T, K),
            "torch_one_stage_topk": lambda: (q_all @ keys.T).topk(2 * K + 8, dim=1),  # before the chunked top-k
            "faiss_IndexFlatIP": lambda: index.search(qn, K + 1),
            "faiss_knn": lambda: faiss.knn(qn, kn, K + 1, metric=faiss.METRIC_INNER_PRODUCT),
        }, max(3, rounds // 2), 1)
        out.append({**s, "world": world, "slots_per_rank": sharded.slots, "step_seconds": times,
                    "search_seconds": search, "bytes_sharded": queue_bytes(sharded),
                    "bytes_replicated": replicated.nbytes()})
    return out


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--slots", type=int, nargs="+", default=[8192, 32768], help="fixed Q/W settings")
    ap.add_argument("--global-q", type=int, default=98304, help="a fixed-Q setting (divisible by every W)")
    ap.add_argument("--batch", type=int, default=64, help="queries per rank per step")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args(argv)
    rows = []
    for w in args.worlds:
        settings = [{"q": s * w, "kind": "fixed Q/W"} for s in args.slots]
        if args.global_q % w == 0:
            settings.append({"q": args.global_q, "kind": "fixed Q"})
        per_rank = spawn_gloo(measure, w, settings, args.batch, args.rounds, threads=1)
        for i, s in enumerate(per_rank[0]):
            def slowest(key, name):  # a collective step lasts as long as its slowest rank
                return [max(r[i][key][name][j] for r in per_rank) for j in range(len(s[key][name]))]
            row = {k: s[k] for k in ("q", "kind", "world", "slots_per_rank", "bytes_sharded", "bytes_replicated")}
            row["step_ms"] = {n: median(slowest("step_seconds", n)) * 1000 for n in s["step_seconds"]}
            row["search_ms"] = {n: median(slowest("search_seconds", n)) * 1000 for n in s["search_seconds"]}
            row["entry_bytes"] = (KEY_DIM + VALUE_DIM) * 4 + 16
            rows.append(row)
            print(f"W={w} Q={row['q']}: sharded {row['step_ms']['sharded']:.1f} ms, replicated "
                  f"{row['step_ms']['replicated']:.1f} ms; search torch {row['search_ms']['torch']:.1f} ms, faiss "
                  f"{row['search_ms']['faiss_IndexFlatIP']:.1f} ms", flush=True)
    write("queue_scaling", {"config": vars(args), "key_dim": KEY_DIM, "value_dim": VALUE_DIM, "k": K, "rows": rows})
    _plot(rows)
    print(table([[r["kind"], r["world"], r["q"], r["slots_per_rank"],
                  round(r["bytes_sharded"] / 2**20, 1), round(r["bytes_sharded"] / (r["slots_per_rank"] * r["entry_bytes"]), 3),
                  round(r["bytes_replicated"] / 2**20, 1),
                  round(r["step_ms"]["sharded"], 1), round(r["step_ms"]["replicated"], 1),
                  round(r["step_ms"]["replicated"] / r["step_ms"]["sharded"], 2),
                  round(r["search_ms"]["faiss_IndexFlatIP"] / r["search_ms"]["torch"], 2),
                  round(r["search_ms"]["faiss_knn"] / r["search_ms"]["torch"], 2),
                  round(r["search_ms"]["torch_one_stage_topk"] / r["search_ms"]["torch"], 2)] for r in rows],
                ["Q", "W", "Q total", "Q/W", "MiB/rank sharded", "= Q/W entries x", "MiB/rank replicated",
                 "sharded ms/step", "replicated ms/step", "replicated/sharded",
                 "faiss Flat/torch search", "faiss.knn/torch search", "one-stage topk/torch search"]))
    return {"rows": rows}


def _plot(rows) -> None:
    from hncl.evaluate.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for slots in sorted({r["slots_per_rank"] for r in rows if r["kind"] == "fixed Q/W"}):
        rs = [r for r in rows if r["kind"] == "fixed Q/W" and r["slots_per_rank"] == slots]
        for design, style in (("sharded", "-o"), ("replicated", "--x")):
            axes[0].plot([r["world"] for r in rs], [r["step_ms"][design] for r in rs], style, label=f"{design}, Q/W={slots}")
    axes[0].set(xlabel="W (gloo processes)", ylabel="lookup + enqueue, ms/step", title="fixed Q/W")
    rs = [r for r in rows if r["kind"] == "fixed Q"]
    for design, style in (("sharded", "-o"), ("replicated", "--x")):
        axes[1].plot([r["world"] for r in rs], [r["bytes_sharded" if design == "sharded" else "bytes_replicated"] / 2**20
                                                 for r in rs], style, label=design)
    axes[1].set(xlabel="W", ylabel="queue MiB per rank", title=f"fixed Q={rs[0]['q'] if rs else '-'}")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "queue_scaling.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
