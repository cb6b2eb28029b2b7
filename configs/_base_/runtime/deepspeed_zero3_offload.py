# DeepSpeed ZeRO-3 with optimizer and parameters offloaded to CPU (the seed's scripts/zero3_offload.json, whose
# optimizer / scheduler sections are replaced by cambrian's per-module groups and warmup + cosine).
runner = dict(type="deepspeed", config="cambrian::_base_/runtime/zero3_offload.json")
log = dict(interval=10, tensorboard=True, plot=True)
seed = 42
