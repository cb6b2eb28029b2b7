# SVA as in Cambrian-8B (reference §B.4/§B.5): C=1024, depth 3, one query group of 576, and 10 in-LLM samplers
# after decoder layers 0, 3, ..., 27 (for a 32-layer LLM such as LLaMA-3-8B).
_connector = dict(
    type="sva",
    vision_hidden_size=1024,
    num_query_group=1,
    query_num_list=[576],
    connector_depth=3,
    connector_only=False,
    num_of_vision_sampler_layers=10,
    start_of_vision_sampler_layers=0,
    stride_of_vision_sampler_layers=3,
)
