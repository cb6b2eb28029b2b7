_base_ = ["./toy_leaf.py"]
model = dict(connector=dict(_delete_=True, type="toy_conector", connector_depth=1))
