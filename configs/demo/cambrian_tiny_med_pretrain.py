# Stage 1 of the CPU-sized demo model on the bundled demo data (connector only).
_base_ = [
    "./cambrian_tiny_med.py",
    "../_base_/datasets/bundled_demo.py",
    "../_base_/schedules/demo_pretrain.py",
    "../_base_/runtime/single.py",
]
# the caption records of the converted demo set (scripts/quickstart.sh: cambrian data mix --stage caption)
data = dict(train="{{$CAMBRIAN_DATA:data}}/bundled_demo/stage1_caption.jsonl")
