#!/usr/bin/env bash
# Freeze policy x training-data fraction on hymenoptera (ants vs bees), default backbone
# (ImageNet EfficientNet-Lite0), 3 seeds each: 2 x 3 x 3 = 18 runs, 6 epochs each
# (two_stage: 3 head-only + 3 fine-tuning epochs). The seed also draws the training subset.
# Needs $TRANSFERLAB_DATA_DIR/hymenoptera. About 15 minutes on 2 CPU cores.
set -euo pipefail
transferlab-train -m name=freeze_vs_data_fraction dataset=hymenoptera \
    augment=crop_flip augment.scale_min=0.5 trainer.epochs=6 \
    ++freeze.head_epochs=3 ++freeze.finetune_epochs=3 trainer.progress=false \
    freeze=linear_probe,two_stage dataset.train_fraction=1.0,0.25,0.1 seed=0,1,2 "$@"
