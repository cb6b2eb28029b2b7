# DeepSpeed ZeRO-2 (the seed's scripts/zero2.json).
runner = dict(type="deepspeed", config="cambrian::_base_/runtime/zero2.json")
log = dict(interval=10, tensorboard=True, plot=True)
seed = 42
