# The headline recipe: Cambrian-8B's architecture (SigLIP + CLIP + DINOv2 + ConvNeXt towers, SVA with 10 in-LLM
# samplers, LLaMA-3-8B-Instruct) instruction-tuned on medical data with the seed's stage-2 settings.
#   cambrian train configs/cambrian/sva_llama3_8b_pretrain.py --launcher torchrun --nproc 8   # stage 1
#   cambrian train configs/sva_llama3.py --launcher torchrun --nproc 8                        # stage 2
# Weights come from $CAMBRIAN_WEIGHTS (local folders only), data from $CAMBRIAN_DATA; see docs/training.md.
_base_ = ["./cambrian/sva_llama3_8b_finetune.py"]
