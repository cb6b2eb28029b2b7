# Ablation: the same run on DeepSpeed ZeRO-3 instead of FSDP2.
_base_ = ["../cambrian/sva_llama3_8b_finetune.py"]
runner = dict(_delete_=True, type="deepspeed", config="cambrian::_base_/runtime/zero3.json")
