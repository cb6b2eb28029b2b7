_base_ = ["./_base_/toy_model.py", "./_base_/schedule.py", "./_base_/runtime.py"]
model = dict(connector=dict(connector_depth=2))
schedule = dict(epochs={{_base_.schedule.grad_accum}})
