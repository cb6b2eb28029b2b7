# DeepSpeed ZeRO-3 (the seed's scripts/zero3.json).
runner = dict(type="deepspeed", config="cambrian::_base_/runtime/zero3.json")
log = dict(interval=10, tensorboard=True, plot=True)
seed = 42
