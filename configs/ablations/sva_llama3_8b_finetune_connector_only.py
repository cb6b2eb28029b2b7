# Ablation: no SVA layers inside the LLM (connector_only=True); everything else as sva_llama3_8b_finetune.
_base_ = ["../cambrian/sva_llama3_8b_finetune.py"]
model = dict(connector=dict(connector_only=True))
load_from = "work_dirs/sva_llama3_8b_pretrain_connector_only/model"  # the stage-1 result of this ablation
