_base_ = ["./toy_leaf.py"]
model = dict(
    connector=dict(conector_depth=4),
)
schedule = dict(warmup_ration=0.1)
