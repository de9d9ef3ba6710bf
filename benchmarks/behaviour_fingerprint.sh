#!/bin/bash
# What a refactor must leave unchanged, through the CLI only (so it runs on the tree before and
# after a move of modules): per-step losses and encoder sha256 of a pretraining run in one
# process and as 2 torchrun ranks, the sha256 of a linear-probe and a fine-tuned classifier, and
# the numbers of `hncl demo --quick --debug --seed 0` (timings aside). Compare two outputs with
# diff (fingerprint.txt) and demo/report.json without its "seconds" keys.
#
#   git worktree add /tmp/before <commit>; git worktree add /tmp/after <commit>
#   PY=$PWD/.venv/bin/python benchmarks/behaviour_fingerprint.sh /tmp/before /tmp/fp-before
#   PY=$PWD/.venv/bin/python benchmarks/behaviour_fingerprint.sh /tmp/after /tmp/fp-after
#   diff /tmp/fp-before/fingerprint.txt /tmp/fp-after/fingerprint.txt
set -e
REPO=$(cd "$1" && pwd); OUT=$2; PY=${PY:-python}
rm -rf "$OUT"; mkdir -p "$OUT"; cd "$OUT"
export PYTHONPATH=$REPO OMP_NUM_THREADS=1 PYTHONHASHSEED=0
H="$PY -m hncl.cli"
$H make-shards --source synthetic --num-samples 256 --seed 1 --image-size 64 --shard-size 64 --out sets/train --quiet
$H make-shards --source synthetic --num-samples 128 --seed 2 --image-size 64 --shard-size 64 --split test \
    --out sets/test --quiet
C="--config $REPO/configs/debug.yaml --debug data.train_shards=sets/train data.steps_per_epoch=4 optim.epochs=2
   optim.warmup_epochs=1 run.log_every=1 run.checkpoint_every=4 data.loader_workers=0"
$H pretrain $C run.name=one > pretrain_one.log 2>&1
$PY -m torch.distributed.run --nproc_per_node 2 -m hncl.cli pretrain $C dist.num_workers=2 run.name=two \
    > pretrain_two.log 2>&1
F="--config $REPO/configs/debug.yaml --debug finetune.train_shards=sets/train finetune.test_shards=sets/test
   finetune.init=runs/one/encoder.safetensors finetune.epochs=2 data.loader_workers=0 finetune.knn_k=5"
$H finetune $F run.name=probe > probe.log 2>&1
$H finetune $F finetune.protocol=finetune finetune.epochs=1 run.name=ft > ft.log 2>&1
$H demo --quick --debug --seed 0 --out demo > demo.log 2>&1
{
  for r in one two; do
    echo "losses $r $($PY -c "import json; print([json.loads(l)['loss'] for l in open('runs/$r/metrics.jsonl')])")"
  done
  sha256sum runs/one/encoder.safetensors runs/two/encoder.safetensors runs/probe/classifier.safetensors \
      runs/ft/classifier.safetensors
  $PY -c "
import json
def strip(d):  # timings differ run to run
    if isinstance(d, dict):
        return {k: strip(v) for k, v in d.items() if 'seconds' not in k}
    return [strip(x) for x in d] if isinstance(d, list) else d
print('demo', json.dumps(strip(json.load(open('demo/report.json'))), sort_keys=True))"
} > fingerprint.txt
echo "wrote $OUT/fingerprint.txt"
