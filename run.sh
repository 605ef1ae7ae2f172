#!/usr/bin/env bash
# Train document-wise memories with guidance.
#
#   bash run.sh            the setting of Park & Choi (IJCAI 2024): Pythia-1B, memory on block 15,
#                          10 WikiText-103 pages
#   bash run.sh quick      a few minutes on a 2-core CPU: SmolLM2-135M, last block, 4 documents
#   bash run.sh sweep      one quick run per key activation (tanh relu sigmoid) x guidance (0 0.1 0.5),
#                          then sweep.csv, sweep.md and sweep.png under SAVE_DIR (default outputs/sweep);
#                          set SWEEP_KEY_ACTIVATIONS, SWEEP_GUIDANCES, SWEEP_NEGATIVE_KEY_TYPES or
#                          SWEEP_PRESET to change the grid
#
# Every value below can be overridden by an environment variable of the same name in upper case,
# for example `DATA_PATH=../shared/data/wikitext-2/valid.txt NUM_EPOCHS=20 bash run.sh quick`.
# Arguments after the preset name are passed to train_guidance.py unchanged and win over both.
set -euo pipefail
cd "$(dirname "$0")"

preset=paper
if [[ $# -gt 0 && $1 != -* ]]; then
  preset=$1
  shift
fi

case "$preset" in
  paper)
    : "${LM_NAME:=pythia}" "${LM_SIZE:=1b}" "${NUM_GPUS:=1}" "${HOOK_MEMORY_LAYER:=15}"
    : "${MAX_LABELS:=10}" "${SEGMENT_LENGTH:=128}" "${MAX_SEGEMENTS:=10}" "${MAX_LENGTH:=256}"
    : "${BATCH_SIZE:=16}" "${LR:=1e-3}" "${NUM_EPOCHS:=500}" "${SAVE_FREQ:=10}"
    ;;
  quick)
    : "${LM_NAME:=smollm2}" "${LM_SIZE:=135m}" "${NUM_GPUS:=0}" "${HOOK_MEMORY_LAYER:=-1}"
    : "${MAX_LABELS:=4}" "${SEGMENT_LENGTH:=32}" "${MAX_SEGEMENTS:=4}" "${MAX_LENGTH:=64}"
    : "${BATCH_SIZE:=16}" "${LR:=3e-3}" "${NUM_EPOCHS:=60}" "${SAVE_FREQ:=5}"
    ;;
  sweep)
    # one quick run per setting; each axis is a space-separated list
    read -r -a key_activations <<< "${SWEEP_KEY_ACTIVATIONS:-tanh relu sigmoid}"
    read -r -a guidances <<< "${SWEEP_GUIDANCES:-0 0.1 0.5}"
    read -r -a negative_key_types <<< "${SWEEP_NEGATIVE_KEY_TYPES:-other}"
    exec python sweep.py run --save_dir "${SAVE_DIR:-outputs/sweep}" --preset "${SWEEP_PRESET:-quick}" \
      --key_activations "${key_activations[@]}" --guidances "${guidances[@]}" \
      --negative_key_types "${negative_key_types[@]}" -- "$@"
    ;;
  *)
    echo "error: unknown preset '$preset'; valid: paper, quick, sweep" >&2
    exit 2
    ;;
esac

# memory and guidance: the values of Park & Choi (IJCAI 2024) in every preset
: "${HOOK_MEMORY_DIM:=32}" "${KEY_DIM:=2}" "${KEY_ACTIVATION:=tanh}" "${LM_ACT:=gelu}"
: "${NEGATIVE_KEY_TYPE:=other}" "${DOCUMENT_KEY_MODULE_TYPE:=linear}"
: "${TARGET_NEGATIVE_CE:=4.5}" "${GUIDANCE:=0.1}" "${GUIDANCE_LOSS:=code}"
: "${NUM_ACCUMULATION_STEPS:=1}" "${GRAD_CLIP_COEFF:=5}" "${SEED:=1}"
: "${WIKITEXT_CONFIG:=wikitext-103-v1}" "${DATA_PATH:=none}" "${LM_PATH:=none}" "${LM_CACHE_DIR:=none}"
: "${SAVE_DIR:=outputs/$LM_NAME/$LM_SIZE}"

python train_guidance.py \
  --lm_name "$LM_NAME" --lm_size "$LM_SIZE" --lm_path "$LM_PATH" --lm_cache_dir "$LM_CACHE_DIR" \
  --num_gpus "$NUM_GPUS" \
  --data_path "$DATA_PATH" --wikitext_config "$WIKITEXT_CONFIG" \
  --max_labels "$MAX_LABELS" --segment_length "$SEGMENT_LENGTH" --max_segements "$MAX_SEGEMENTS" \
  --max_length "$MAX_LENGTH" \
  --hook_memory_layer "$HOOK_MEMORY_LAYER" --hook_memory_dim "$HOOK_MEMORY_DIM" --key_dim "$KEY_DIM" \
  --key_activation "$KEY_ACTIVATION" --lm_act "$LM_ACT" \
  --document_key_module_type "$DOCUMENT_KEY_MODULE_TYPE" --negative_key_type "$NEGATIVE_KEY_TYPE" \
  --target_negative_ce "$TARGET_NEGATIVE_CE" --guidance "$GUIDANCE" --guidance_loss "$GUIDANCE_LOSS" \
  --batch_size "$BATCH_SIZE" --lr "$LR" --num_epochs "$NUM_EPOCHS" \
  --num_accumulation_steps "$NUM_ACCUMULATION_STEPS" --grad_clip_coeff "$GRAD_CLIP_COEFF" \
  --save_freq "$SAVE_FREQ" --seed "$SEED" --save_dir "$SAVE_DIR" \
  "$@"
