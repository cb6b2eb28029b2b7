#!/usr/bin/env bash
# The main job on the embedded default, from nothing: set up, convert the bundled real scans and reports, train
# the demo model `cambrian-tiny-med` in two stages, and ask the trained checkpoint about a real chest X-ray.
# Under 3 minutes on 2 CPU cores once the environment is cached (about 5 from an empty cache). Every step is an ordinary cambrian command; read them to learn the workflow.
#   CAMBRIAN_DATA   where converted data goes (default ./data)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
export CAMBRIAN_DATA=${CAMBRIAN_DATA:-data}
step() { printf '\n==> %s\n' "$*"; }

step "setup"
bash scripts/setup.sh
PATH="$PWD/.venv/bin:$PATH"
demo="$CAMBRIAN_DATA/bundled_demo"

step "1/6 convert the bundled real data (pydicom-data DICOM, scikit-image, IU chest reports) -> $demo"
cambrian convert bundled_demo --src auto --out "$demo" --workers 2

step "2/6 filter: decodable, non-blank images and valid conversations"
# the demo pairs several real chest reports with one real film, so duplicate detection is off here
cambrian data filter "$demo/records.jsonl" --out "$demo/filtered.jsonl" --dedup none

step "3/6 mix: caption records for stage 1, instruction records for stage 2"
cambrian data mix --input "bundled_demo=$demo/filtered.jsonl:1" --stage caption --out "$demo/stage1_caption.jsonl"
cambrian data mix --input "bundled_demo=$demo/filtered.jsonl:1" --stage instruct --out "$demo/stage2_instruct.jsonl"

step "4/6 stage 1: align the SVA connector (towers and LLM frozen)"
cambrian-train configs/demo/cambrian_tiny_med_pretrain.py

step "5/6 stage 2: instruction-tune connector + LLM"
cambrian-train configs/demo/cambrian_tiny_med_finetune.py

step "6/6 ask the trained model about a real PA chest radiograph (pydicom-data RG1_UNCR.dcm)"
chest=$(python -c "from cambrian_core.assets import dicom_file; print(dicom_file('RG1_UNCR.dcm'))")
cambrian infer --model work_dirs/cambrian_tiny_med_finetune/model --image "$chest" --window percentile \
    --max-new-tokens 80 --repetition-penalty 1.1 --prompt "Describe the findings of this chest X-ray."

printf '\nDone. Loss curves: work_dirs/*/loss_curve.png; TensorBoard: tensorboard --logdir work_dirs\n'
