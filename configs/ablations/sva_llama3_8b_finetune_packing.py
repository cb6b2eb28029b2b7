# Ablation: several samples packed per sequence instead of one sample per row with dynamic padding.
_base_ = ["../cambrian/sva_llama3_8b_finetune.py"]
data = dict(packing=True)
