# SVA as in Cambrian-34B: C=1024, depth 3, 576 queries, 9 in-LLM samplers after layers 0, 7, ..., 56 (60 layers).
_connector = dict(
    type="sva",
    vision_hidden_size=1024,
    num_query_group=1,
    query_num_list=[576],
    connector_depth=3,
    connector_only=False,
    num_of_vision_sampler_layers=9,
    start_of_vision_sampler_layers=0,
    stride_of_vision_sampler_layers=7,
)
