# Stage 2 of the CPU-sized demo model: connector + LLM (+ its trainable ViT tower), from the stage-1 result.
_base_ = [
    "./cambrian_tiny_med.py",
    "../_base_/datasets/bundled_demo.py",
    "../_base_/schedules/demo_finetune.py",
    "../_base_/runtime/single.py",
]
load_from = "work_dirs/cambrian_tiny_med_pretrain/model"
# the instruct records of the converted demo set (scripts/quickstart.sh: cambrian data mix --stage instruct)
data = dict(train="{{$CAMBRIAN_DATA:data}}/bundled_demo/stage2_instruct.jsonl")
