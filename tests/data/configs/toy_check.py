_base_ = ["./toy_leaf.py"]
model = dict(connector=dict(connector_depth=0))
