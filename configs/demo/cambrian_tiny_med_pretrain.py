# Stage 1 of the CPU-sized demo model on the bundled demo data (connector only).
_base_ = [
    "./cambrian_tiny_med.py",
    "../_base_/datasets/bundled_demo.py",
    "../_base_/schedules/demo_pretrain.py",
    "../_base_/runtime/single.py",
]
