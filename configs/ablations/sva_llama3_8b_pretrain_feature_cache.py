# Ablation: stage 1 reading the frozen towers' outputs from the feature cache (built once, reused by later runs).
_base_ = ["../cambrian/sva_llama3_8b_pretrain.py"]
data = dict(feature_cache="{{$CAMBRIAN_CACHE:work_dirs/feature_cache}}")
