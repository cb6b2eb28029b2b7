# Ablation: LoRA (r 64, alpha 16, dropout 0.05: the seed's defaults) on the LLM instead of full fine-tuning.
_base_ = ["../cambrian/sva_llama3_8b_finetune.py"]
lora = dict(r=64, alpha=16, dropout=0.05)
