model = dict(
    type="toy_vlm",
    connector=dict(type="toy_connector", connector_depth=3, num_query_group=1),
    hidden=64,
)
