# FSDP2 across the torchrun processes (one GPU each; gloo on CPU), TensorBoard, loss curve.
runner = dict(type="fsdp")
log = dict(interval=10, tensorboard=True, plot=True)
seed = 42
