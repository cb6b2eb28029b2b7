# Ablation: stage 1 with no SVA layers inside the LLM (connector_only=True); everything else as sva_llama3_8b_pretrain.
# Its model (work_dirs/sva_llama3_8b_pretrain_connector_only/model) is what sva_llama3_8b_finetune_connector_only loads.
_base_ = ["../cambrian/sva_llama3_8b_pretrain.py"]
model = dict(connector=dict(connector_only=True))
