#!/usr/bin/env bash
# One device call: our benchmark for the README table next to its peers, torchvision (eager and
# torch.compile) and flax's plain ResNet (benchmarks/peer_flax.py), in the same call.
#
#   here:       bash benchmarks/prepare_device.sh          # .whl/: ml-collections + the peer script
#   on device:  run(command="bash benchmarks/device_benchmark.sh", carry=[".whl"])
#
# jax, flax, optax, orbax, torch and torchvision are in the device image; TensorFlow is not
# and is not needed (synthetic data). Writes one JSON line per measurement to $OUT and
# prints a table last. MODELS="resnet50:224" limits the run to those models: all four
# with their peers take longer than one device call may (600 s), so split them (estimates,
# not yet timed: ~1.5 min per model for ours, as much for flax, 2-3 for torchvision with
# torch.compile, ~1 min per XLA variant or compile report):
#   1. MODELS="resnet50:224" COMPILE_REPORT=1 PROFILE=1 XLA_VARIANTS="...;..." DISPATCH_VARIANTS="4"
#      (TRAINER=1 here or in call 4)
#   2. MODELS="resnet18:224 resnetrs50:160"
#   3. MODELS="resnet101:224"
#   4. MODELS="" MAX_BATCH=1     (an empty MODELS times no model)
# Each line of $OUT/*.jsonl is written when its run ends, so a call cut short keeps what
# finished. FLAX_PEER=0 skips the flax peer. BATCH_SIZE (256) and STEPS (100) shrink the model
# and profile runs for a dry run of this script on a CPU, e.g.
#   MODELS="resnet18:32" BATCH_SIZE=8 STEPS=10 PROFILE=1 bash benchmarks/device_benchmark.sh
# XLA_VARIANTS: ';'-separated XLA_FLAGS strings; ResNet-50 is timed once more under each
# (e.g. XLA_VARIANTS="--xla_gpu_enable_latency_hiding_scheduler=true;--xla_gpu_autotune_level=0").
# DISPATCH_VARIANTS: space-separated K; ResNet-50 is timed once more with K steps per dispatch
# (resnet-jax benchmark --steps-per-dispatch K: one jax.lax.scan call for K steps).
# VARIANT_MODEL (resnet50:224) is the model of both variant kinds (a small one for a CPU dry run).
# MAX_BATCH=1 searches ResNet-50's largest batch on the device (resnet-jax benchmark --find-max-batch:
# doubling from BATCH_SIZE, then bisecting to 1/16; ~8 compiles, predicted 1,472 (56.6 GiB) within 59 GiB by
# gpu_compile_report.py --max-batch-within 59): $OUT/max_batch.jsonl, a call of its own.
# TRAINER=1 times `resnet-jax train` (the modern recipe of VARIANT_MODEL on fake data made on the host,
# 3 x STEPS steps) against the bare step of the same recipe: what the loop and the host-to-device
# copies cost ($OUT/trainer.jsonl, $OUT/trainer_metrics.jsonl).
# COMPILE_REPORT=1 also compiles ResNet-50 on the device (autotuned) with
# benchmarks/gpu_compile_report.py, to check the traffic and memory predicted without one.
# PROFILE=1 traces ResNet-50 (jax.profiler, 4 steps, command buffers off so that every kernel
# names its HLO instruction) and runs benchmarks/kernel_bandwidth.py
# on the trace: $OUT/kernel_bandwidth.txt (and .json) ranks the kernels by time lost against
# peak bandwidth; the trace itself comes back as $OUT/resnet50_profile.tar.gz (TensorBoard).
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
BATCH=${BATCH_SIZE:-256}; STEPS=${STEPS:-100}
PEER=.whl/peer_torchvision.py
[ -f "$PEER" ] || PEER=../shared/bench/peer_torchvision.py
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)" | tee -a "$OUT/device.txt"
for spec in ${MODELS-resnet50:224 resnet18:224 resnet101:224 resnetrs50:160}; do
  model=${spec%%:*}; size=${spec##*:}
  [[ $spec == *:* ]] || size=224
  echo "== ours $model @$size"
  recipe=()  # ResNet-RS: the recipe's step (EMA 0.9999, label smoothing, dropout 0.25), as it trains
  # (scaled-D-S: the paper's scaling rules, which give the published rsD-S recipes exactly)
  [[ $model == resnetrs* ]] && recipe=(--config "configs/resnet_rs.py:scaled-${model#resnetrs}-$size")
  python3 -m resnet_jax.cli benchmark --json "${recipe[@]}" --model "$model" --batch-size "$BATCH" --image-size "$size" \
    --dtype bfloat16 --steps "$STEPS" | tail -1 | tee -a "$OUT/ours.jsonl"
  if python3 -c "import torchvision.models as m, sys; sys.exit(not hasattr(m, '$model'))"; then
    echo "== torchvision $model @$size"
    python3 "$PEER" --model "$model" --batch-size "$BATCH" --image-size "$size" | tee -a "$OUT/peer.jsonl"
  fi
  if [ "${FLAX_PEER:-1}" = 1 ] && python3 -c "import benchmarks.peer_flax as p, sys; sys.exit('$model' not in p.STAGES)"; then
    echo "== plain flax $model @$size"
    python3 benchmarks/peer_flax.py --model "$model" --batch-size "$BATCH" --image-size "$size" --steps "$STEPS" \
      | tail -1 | tee -a "$OUT/peer.jsonl"
  fi
done
VARIANT=${VARIANT_MODEL:-resnet50:224}; vmodel=${VARIANT%%:*}; vsize=${VARIANT##*:}
IFS=';' read -ra variants <<< "${XLA_VARIANTS:-}"
for flags in "${variants[@]}"; do
  [ -n "$flags" ] || continue
  echo "== ours $vmodel @$vsize with XLA_FLAGS=$flags"
  XLA_FLAGS="$flags" python3 -m resnet_jax.cli benchmark --json --model "$vmodel" --batch-size "$BATCH" --image-size "$vsize" \
    --dtype bfloat16 --steps "$STEPS" | tail -1 | tee -a "$OUT/variants.jsonl"
done
for k in ${DISPATCH_VARIANTS:-}; do
  echo "== ours $vmodel @$vsize with $k steps per dispatch"
  python3 -m resnet_jax.cli benchmark --json --model "$vmodel" --batch-size "$BATCH" --image-size "$vsize" \
    --dtype bfloat16 --steps "$STEPS" --steps-per-dispatch "$k" | tail -1 | tee -a "$OUT/variants.jsonl"
done
if [ "${MAX_BATCH:-0}" = 1 ]; then
  echo "== ours $vmodel @$vsize: the largest batch that fits"
  python3 -m resnet_jax.cli benchmark --json --model "$vmodel" --batch-size "$BATCH" --image-size "$vsize" \
    --dtype bfloat16 --steps 10 --find-max-batch | tail -1 | tee -a "$OUT/max_batch.jsonl"
fi
if [ "${TRAINER:-0}" = 1 ]; then
  # What users run: the whole training loop (host batches put on the device, metrics kept on it,
  # a log line every STEPS/2 steps), against the bare step of the same recipe, in one call.
  trainer_recipe="configs/imagenet_resnet.py:$vmodel-modern"
  echo "== resnet-jax train $trainer_recipe @$vsize on fake data from the host, against its bare step"
  python3 -m resnet_jax.cli benchmark --json --config "$trainer_recipe" --batch-size "$BATCH" --image-size "$vsize" \
    --dtype bfloat16 --steps "$STEPS" | tail -1 | tee -a "$OUT/trainer.jsonl"
  rm -rf /tmp/trainer_workdir
  python3 -m resnet_jax.cli train --config "$trainer_recipe" --workdir /tmp/trainer_workdir --config.data.name=fake \
    --config.data.image_size="$vsize" --config.data.batch_size="$BATCH" --config.data.eval_batch_size="$BATCH" \
    --config.data.fake_eval_size="$BATCH" --config.num_train_steps=$((3 * STEPS)) \
    --config.log_every_steps=$((STEPS / 2)) --config.checkpoint_every_steps=1000000000 \
    --config.eval_every_epochs=1000000 --config.compilation_cache_dir= | tail -4
  cp /tmp/trainer_workdir/metrics.jsonl "$OUT/trainer_metrics.jsonl"
fi
if [ "${COMPILE_REPORT:-0}" = 1 ]; then
  echo "== resnet50 compiled on the device: memory and HBM traffic"
  python3 benchmarks/gpu_compile_report.py --model resnet50 --batch-size 256 --top 10 \
    --dump-hlo "$OUT/resnet50_b256.hlo.txt" | tee "$OUT/compile_report.txt"
fi
if [ "${PROFILE:-0}" = 1 ]; then
  echo "== resnet50 profiled: time per kernel against its bytes"
  rm -rf /tmp/resnet50_profile
  # command buffers (CUDA graphs) off: kernels inside one name no HLO instruction in the trace
  XLA_FLAGS="--xla_gpu_enable_command_buffer=" python3 -m resnet_jax.cli benchmark --model resnet50 \
    --batch-size "$BATCH" --image-size 224 --dtype bfloat16 --steps 20 --profile /tmp/resnet50_profile | tail -3
  python3 benchmarks/kernel_bandwidth.py /tmp/resnet50_profile --top 30 | tee "$OUT/kernel_bandwidth.txt"
  python3 benchmarks/kernel_bandwidth.py /tmp/resnet50_profile --json > "$OUT/kernel_bandwidth.json"
  tar -czf "$OUT/resnet50_profile.tar.gz" -C /tmp resnet50_profile
fi
python3 - "$OUT" <<'PY'
import json, os, sys

def rows(path):
    return [json.loads(line) for line in open(path) if line.startswith("{")] if os.path.exists(path) else []

ours, peer = rows(f"{sys.argv[1]}/ours.jsonl"), rows(f"{sys.argv[1]}/peer.jsonl")
print(f"{'model':<12}{'size':>5}{'ours img/s':>12}{'MFU':>7}{'mem GiB':>9}{'compile s':>10}"
      f"{'tv eager':>10}{'tv compile':>11}{'flax':>8}{'ratio':>7}{'tv mem GiB':>11}{'flax mem':>9}")
for r in ours:
    # peer rows of the same model and size, keyed "eager" / "compile" (torchvision) and "flax"
    same = [q for q in peer if q["image_size"] == r["image_size"]]
    tv = {q["peer"].split()[-1].replace("torch.", ""): q for q in same
          if q["peer"].split()[0] == f"torchvision.{r['model']}"}
    tv.update({"flax": q for q in same if q["peer"].split()[0] == f"flax.{r['model']}"})
    best = max((q["images_per_s"] for q in tv.values()), default=None)
    tv_mem = max((tv[k]["peak_memory_gib"] or 0 for k in ("eager", "compile") if k in tv), default=0)
    rate = {k: f"{tv[k]['images_per_s']:.0f}" if k in tv else "-" for k in ("eager", "compile", "flax")}
    ratio = r["images_per_second"] / best if best else float("nan")
    print(f"{r['model']:<12}{r['image_size']:>5}{r['images_per_second']:>12.0f}{100 * (r['mfu'] or 0):>6.1f}%"
          f"{r['peak_memory_gib'] or 0:>9.1f}{r['compile_seconds']:>10.1f}{rate['eager']:>10}{rate['compile']:>11}"
          f"{rate['flax']:>8}{ratio:>7.2f}{tv_mem:>11.1f}{(tv.get('flax') or {}).get('peak_memory_gib') or 0:>9.1f}")
print("ratio: ours / the fastest peer of the row (torchvision eager, torch.compile, plain flax)")
for m in rows(f"{sys.argv[1]}/max_batch.jsonl"):
    print(f"{m['model']} @{m['image_size']} largest batch: {m['max_batch']}"
          + (f" ({m['max_batch_fails']} does not fit)" if m["max_batch_fails"] else "")
          + f" within the {m['memory_limit_gib']:.1f} GiB XLA may allocate")
windows = [m["images_per_second"] for m in rows(f"{sys.argv[1]}/trainer_metrics.jsonl") if m["split"] == "train"]
for bare in rows(f"{sys.argv[1]}/trainer.jsonl")[-1:]:
    steady = sorted(windows[1:] or windows)  # the first window follows compilation: left out
    if steady:
        median = steady[len(steady) // 2]
        print(f"resnet-jax train {bare['config']} @{bare['image_size']}, batch {bare['batch_size']}: {median:.0f} img/s "
              f"(median of {len(steady)} log windows, {steady[0]:.0f}-{steady[-1]:.0f}); its bare step "
              f"{bare['images_per_second']:.0f}: {median / bare['images_per_second'] - 1:+.1%}")
for v in rows(f"{sys.argv[1]}/variants.jsonl"):
    base = next((r["images_per_second"] for r in ours
                 if (r["model"], r["image_size"], r["batch_size"]) == (v["model"], v["image_size"], v["batch_size"])), None)
    change = f"{v['images_per_second'] / base - 1:+.1%} vs the plain run of this model" if base else ""
    what = f"XLA_FLAGS={v['xla_flags']}" if v["xla_flags"] else ""
    what += f" {v['steps_per_dispatch']} steps per dispatch" if v.get("steps_per_dispatch", 1) > 1 else ""
    print(f"{v['model']} @{v['image_size']} {what.strip()}: {v['images_per_second']:.0f} img/s "
          f"(min {v['images_per_second_min']:.0f}, max {v['images_per_second_max']:.0f}) {change}")
PY
