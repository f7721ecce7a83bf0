#!/usr/bin/env bash
# Does autoencoder pretraining help a small conv net when labels are scarce? digits at 32 px,
# transferlab's conv_encoder: its conv layers pretrained as an autoencoder and frozen (fc and
# head train) vs the same network from scratch (everything trains), with 5%, 20% and 100% of
# the training labels, 3 seeds each (the seed also draws the labelled subset):
# 1 autoencoder run + 2 x 3 x 3 = 18 classifier runs of 30 epochs. About 4 minutes on 2 CPU cores.
# Run from the repository root; everything goes under $OUT (default outputs/ae_transfer_digits).
set -euo pipefail
OUT=${OUT:-outputs/ae_transfer_digits}
EPOCHS=${EPOCHS:-30}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny networks train fastest on one thread
SWEEP=(trainer.epochs="$EPOCHS" trainer.progress=false
       dataset.train_fraction=0.05,0.2,1.0 seed=0,1,2)

# 1. Unsupervised pretraining on the images of the training split (labels unused), 20 epochs.
transferlab-train experiment=ae_pretrain trainer.progress=false hydra.run.dir="$OUT/ae"
# 2. Its conv layers restored (encoder.conv* -> conv*) and frozen; fc and the head train.
transferlab-train -m experiment=ae_transfer backbone.init.path="$OUT/ae/checkpoints/best.pt" \
    "${SWEEP[@]}" hydra.sweep.dir="$OUT/sweeps/pretrained"
# 3. The same architecture from random weights, every layer trains.
transferlab-train -m experiment=ae_scratch \
    "${SWEEP[@]}" hydra.sweep.dir="$OUT/sweeps/scratch"
# 4. Mean +- std over the 3 seeds of every (policy, label fraction).
transferlab-compare "$OUT/sweeps" group_seeds=true format=markdown plot=false
