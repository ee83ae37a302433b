#!/usr/bin/env bash
# Prepare ImageNet (ILSVRC2012) as tfds `imagenet2012` and copy it to a bucket, once.
#
#   launch/prepare_imagenet.sh ~/imagenet_tars gs://my-bucket/tfds
#
# ~/imagenet_tars must hold ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from
# image-net.org, after accepting its terms). Needs ~300 GB of local disk and a few hours
# on 16+ cores. The TPU/GPU jobs then read --config.data.data_dir=gs://my-bucket/tfds.
set -euo pipefail
MANUAL_DIR=${1:?directory with ILSVRC2012_img_{train,val}.tar}
DEST=${2:?gs://bucket/tfds or a shared path}
LOCAL=${LOCAL_DIR:-$HOME/tensorflow_datasets}
python3 -m pip install -q tensorflow-datasets tensorflow-cpu
tfds build imagenet2012 --data_dir="$LOCAL" --manual_dir="$MANUAL_DIR"
if [[ "$DEST" == gs://* ]]; then
  gcloud storage cp -r "$LOCAL/imagenet2012" "$DEST/"
else
  mkdir -p "$DEST" && cp -r "$LOCAL/imagenet2012" "$DEST/"
fi
echo "done: --config.data.data_dir=$DEST"
